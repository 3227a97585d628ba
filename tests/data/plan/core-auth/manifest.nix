# As upstream: postgresql (core) has an OIDC client at authentik, and authentik keeps its data
# in postgresql. The client is created by tf:auth-core, so this is not a cycle.
{
  network = { gateway = "10.1.0.1"; network_cidr = "10.1.0.0/24"; };
  core_services = {
    postgresql = {
      ip = "10.1.0.2";
      interface = {
        auth = { type = "oidc"; provider = "authentik"; oidc.client_id = "pgadmin"; };
        health.liveness = "pg_isready";
      };
    };
    authentik = {
      ip = "10.1.0.3";
      interface = {
        db = { host = "10.1.0.2"; name = "authentik"; };
        health.liveness = "true";
      };
    };
  };
  services.wiki = {
    ip = "10.1.0.4"; depends_on = [ "authentik" ];
    interface = {
      auth = { type = "oidc"; provider = "authentik"; };
      health.liveness = "true";
    };
  };
}
