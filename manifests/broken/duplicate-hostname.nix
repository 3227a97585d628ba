# Two services with the same hostname.
let base = import ./base.nix; in
base // { services = base.services // { wiki = { ip = "10.30.0.6"; hostname = "gitea.lab.lan"; vmid = 406; interface.health.liveness = "true"; }; }; }
