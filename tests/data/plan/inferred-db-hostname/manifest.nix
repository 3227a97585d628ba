# No depends_on at all: the db host names postgresql by hostname, so gitea waits for it.
{
  network = { domain = "lab.lan"; gateway = "10.1.0.1"; network_cidr = "10.1.0.0/24"; };
  core_services.postgresql = { ip = "10.1.0.2"; hostname = "pg.lab.lan"; interface.health.liveness = "true"; };
  services.gitea = {
    ip = "10.1.0.3";
    interface = {
      db = { host = "pg.lab.lan"; name = "gitea"; };
      health.liveness = "true";
    };
  };
}
