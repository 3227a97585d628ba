# --service api plans api and what it needs (db, and through it dns), not web.
{
  network = { gateway = "10.1.0.1"; network_cidr = "10.1.0.0/24"; };
  core_services = {
    dns = { ip = "10.1.0.2"; interface.health.liveness = "true"; };
    db = { ip = "10.1.0.3"; depends_on = [ "dns" ]; interface.health.liveness = "true"; };
  };
  services = {
    api = { ip = "10.1.0.4"; depends_on = [ "db" ]; interface.health.liveness = "true"; };
    web = { ip = "10.1.0.5"; depends_on = [ "api" ]; interface.health.liveness = "true"; };
  };
}
