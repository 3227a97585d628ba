# Per-proxy auth in a multi-proxy map (as upstream's media) infers the provider dependency and
# needs tf:service-config for the provider's apps.
{
  network = { gateway = "10.1.0.1"; network_cidr = "10.1.0.0/24"; };
  core_services.authentik = { ip = "10.1.0.2"; interface.health.liveness = "true"; };
  services.media = {
    ip = "10.1.0.3";
    interface = {
      proxy = {
        jellyfin = { domain = "jf.lab.lan"; upstream = "10.1.0.3:8096"; auth = { type = "oidc"; provider = "authentik"; }; };
        sonarr = { domain = "sonarr.lab.lan"; upstream = "10.1.0.3:8989"; };
      };
      health.liveness = "true";
    };
  };
}
