# Shared by the broken manifests: a valid two-service homelab to break one field at a time.
{
  network = {
    domain = "lab.lan";
    gateway = "10.30.0.1";
    network_cidr = "10.30.0.0/24";
  };
  core_services.postgresql = {
    ip = "10.30.0.2"; hostname = "postgresql.lab.lan"; vmid = 402;
    interface.health.liveness = "pg_isready";
  };
  services.gitea = {
    ip = "10.30.0.3"; hostname = "gitea.lab.lan"; vmid = 403;
    depends_on = [ "postgresql" ];
    interface = {
      proxy = { domain = "git.lab.lan"; upstream = "10.30.0.3:3000"; };
      health.liveness = "curl -fsS http://localhost:3000/";
    };
  };
}
