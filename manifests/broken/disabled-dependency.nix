# gitea is enabled but depends on a disabled service.
let base = import ./base.nix; in
base // {
  services = base.services // {
    redis = { enable = false; ip = "10.30.0.9"; hostname = "redis.lab.lan"; vmid = 409; };
    gitea = base.services.gitea // { depends_on = [ "postgresql" "redis" ]; };
  };
}
