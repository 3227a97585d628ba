# Two services on the same address.
let base = import ./base.nix; in
base // { services = base.services // { wiki = { ip = "10.30.0.3"; hostname = "wiki.lab.lan"; vmid = 406; interface.health.liveness = "true"; }; }; }
