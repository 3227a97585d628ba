# The smallest useful NixMox manifest: a database and one application that uses it.
{
  network = {
    domain = "lab.lan";
    gateway = "10.20.0.1";
    network_cidr = "10.20.0.0/24";
  };
  core_services.postgresql = {
    ip = "10.20.0.2"; hostname = "postgresql.lab.lan"; vmid = 302;
    interface.health = { startup = "systemctl is-active --quiet postgresql"; liveness = "pg_isready"; };
  };
  services.gitea = {
    ip = "10.20.0.3"; hostname = "gitea.lab.lan"; vmid = 303;
    depends_on = [ "postgresql" ];
    ports = [ 3000 ];
    interface = {
      db = { host = "10.20.0.2"; name = "gitea"; owner = "gitea"; port = 5432; };
      health = { startup = "systemctl is-active --quiet gitea"; liveness = "curl -fsS http://localhost:3000/"; retries = 5; };
    };
  };
}
