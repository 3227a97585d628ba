# Tries to read a file outside the repository into the manifest (refused in restricted mode).
{
  network.domain = builtins.readFile /etc/hostname;
  services = { };
}
