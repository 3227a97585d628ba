# A service name that cannot be a host name (an underscore).
let base = import ./base.nix; in
base // { services = base.services // { my_wiki = { ip = "10.30.0.4"; hostname = "wiki.lab.lan"; vmid = 404; interface.health.liveness = "true"; }; }; }
