# An address outside network_cidr.
let base = import ./base.nix; in
base // { services.gitea = base.services.gitea // { ip = "10.31.0.3"; }; }
