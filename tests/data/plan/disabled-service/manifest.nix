# A disabled service is not planned, and nothing enabled depends on it.
{
  network = { gateway = "10.1.0.1"; network_cidr = "10.1.0.0/24"; };
  core_services.dns = { ip = "10.1.0.2"; interface.health.liveness = "true"; };
  services = {
    web = { ip = "10.1.0.3"; depends_on = [ "dns" ]; interface.health.liveness = "true"; };
    mail = { enable = false; ip = "10.1.0.4"; depends_on = [ "dns" ]; };
  };
}
