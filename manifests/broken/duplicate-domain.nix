# Two proxies claiming the same domain (one in a multi-proxy map).
let base = import ./base.nix; in
base // {
  services = base.services // {
    wiki = {
      ip = "10.30.0.6"; hostname = "wiki.lab.lan"; vmid = 406;
      interface = {
        proxy = {
          web = { domain = "wiki.lab.lan"; upstream = "10.30.0.6:3000"; };
          api = { domain = "git.lab.lan"; upstream = "10.30.0.6:4000"; };
        };
        health.liveness = "true";
      };
    };
  };
}
