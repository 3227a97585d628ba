# Tries to reach the network during evaluation (refused in restricted mode).
{
  network.domain = builtins.readFile (builtins.fetchurl "http://127.0.0.1:9/secret");
  services = { };
}
