# vmid must be a number and ports a list of numbers.
let base = import ./base.nix; in
base // { services.gitea = base.services.gitea // { vmid = "four-oh-three"; ports = [ "http" ]; }; }
