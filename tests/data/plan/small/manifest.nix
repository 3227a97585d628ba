# One database, one application that depends on it.
{
  network = { gateway = "10.1.0.1"; network_cidr = "10.1.0.0/24"; };
  core_services.postgresql = { ip = "10.1.0.2"; interface.health.liveness = "pg_isready"; };
  services.gitea = {
    ip = "10.1.0.3"; depends_on = [ "postgresql" ];
    interface.health.liveness = "curl -fsS localhost:3000";
  };
}
