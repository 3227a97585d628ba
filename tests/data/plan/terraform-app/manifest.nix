# An application with terraform modules gets tf:service-infra before and tf:service-config
# after its NixOS step; tf:service-config also waits for tf:auth-core.
{
  network = { gateway = "10.1.0.1"; network_cidr = "10.1.0.0/24"; };
  core_services.authentik = { ip = "10.1.0.2"; interface.health.liveness = "true"; };
  services.vault = {
    ip = "10.1.0.3"; depends_on = [ "authentik" ];
    interface = {
      terraform = { modules = [ "./terraform/vault" ]; targets = [ "terraform_data.app" ]; };
      health.liveness = "true";
    };
  };
}
