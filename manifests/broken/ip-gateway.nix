# The gateway's address.
let base = import ./base.nix; in
base // { services.gitea = base.services.gitea // { ip = "10.30.0.1"; }; }
