# gitea depends on a service that does not exist (a typo of postgresql).
let base = import ./base.nix; in
base // { services.gitea = base.services.gitea // { depends_on = [ "postgres" ]; }; }
