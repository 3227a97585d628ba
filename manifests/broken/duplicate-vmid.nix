# Two containers with the same Proxmox vmid.
let base = import ./base.nix; in
base // { services = base.services // { wiki = { ip = "10.30.0.6"; hostname = "wiki.lab.lan"; vmid = 403; interface.health.liveness = "true"; }; }; }
