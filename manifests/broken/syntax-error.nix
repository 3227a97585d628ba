# A missing semicolon.
{
  network = { domain = "lab.lan" }
  services = { };
}
