# A core service (deployed first) that depends on an application service.
let base = import ./base.nix; in
base // {
  core_services.postgresql = base.core_services.postgresql // { depends_on = [ "gitea" ]; };
  services.gitea = base.services.gitea // { depends_on = [ ]; };
}
