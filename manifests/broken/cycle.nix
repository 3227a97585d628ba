# Three services that wait for each other: gitea → runner → cache → gitea.
let base = import ./base.nix; health.liveness = "true"; in
base // {
  services = {
    gitea = base.services.gitea // { depends_on = [ "postgresql" "runner" ]; };
    runner = { ip = "10.30.0.4"; hostname = "runner.lab.lan"; vmid = 404; depends_on = [ "cache" ]; interface = { inherit health; }; };
    cache = { ip = "10.30.0.5"; hostname = "cache.lab.lan"; vmid = 405; depends_on = [ "gitea" ]; interface = { inherit health; }; };
  };
}
