# Example NixMox homelab: four core services and five applications.
# Uses every interface kind: terraform, db, dbs, proxy (single and multi), health, auth.
let
  domain = "home.lan";
  health = unit: {
    startup = "systemctl is-active --quiet ${unit}";
    liveness = "systemctl is-active --quiet ${unit}";
    interval = 10;
    timeout = 30;
    retries = 3;
  };
  oidc = redirect: {
    type = "oidc";
    provider = "authentik";
    oidc = {
      client_type = "confidential";
      redirect_uris = [ redirect ];
      scopes = [ "openid" "email" "profile" ];
      username_claim = "preferred_username";
      groups_claim = "groups";
    };
  };
  small = { cores = 2; memory = 2048; disk_gb = 16; };
in
{
  network = {
    inherit domain;
    dns_server = "10.10.0.3";
    gateway = "10.10.0.1";
    network_cidr = "10.10.0.0/24";
    vlan_tag = 10;
    ssh_keys.root = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnlyForDocumentation admin@home" ];
    outposts.ldap.base_dn = "dc=home,dc=lan";
  };

  core_services = {
    dns = {
      ip = "10.10.0.3"; hostname = "dns.${domain}"; vmid = 203;
      resources = small; onboot = true; start = true;
      interface.health = health "unbound";
    };
    postgresql = {
      ip = "10.10.0.4"; hostname = "postgresql.${domain}"; vmid = 204;
      resources = { cores = 4; memory = 4096; disk_gb = 64; };
      onboot = true; start = true;
      interface.health = health "postgresql";
    };
    caddy = {
      ip = "10.10.0.5"; hostname = "caddy.${domain}"; vmid = 205;
      resources = small; onboot = true; start = true;
      depends_on = [ "dns" ];
      interface.health = health "caddy";
    };
    authentik = {
      ip = "10.10.0.6"; hostname = "authentik.${domain}"; vmid = 206;
      resources = small; onboot = true; start = true;
      depends_on = [ "caddy" ];
      interface = {
        db = { host = "10.10.0.4"; name = "authentik"; owner = "authentik"; port = 5432; };
        proxy = { domain = "auth.${domain}"; path = "/"; upstream = "10.10.0.6:9000"; };
        health = health "authentik";
      };
    };
  };

  services = {
    vaultwarden = {
      ip = "10.10.0.10"; hostname = "vaultwarden.${domain}"; vmid = 210;
      resources = small; onboot = true; start = true;
      depends_on = [ "caddy" "authentik" ];
      ports = [ 8080 ];
      interface = {
        terraform = {
          modules = [ "./terraform/vaultwarden" ];
          targets = [ "terraform_data.oidc_app" ];
          variables = { oidc_client_id = "vaultwarden"; };
        };
        db = { host = "10.10.0.4"; name = "vaultwarden"; owner = "vaultwarden"; port = 5432; };
        auth = oidc "https://vault.${domain}/identity/connect/oidc-signin";
        proxy = { domain = "vault.${domain}"; path = "/"; upstream = "10.10.0.10:8080"; };
        health = health "vaultwarden" // { liveness = "curl -fsS http://localhost:8080/alive"; };
      };
    };

    nextcloud = {
      ip = "10.10.0.11"; hostname = "nextcloud.${domain}"; vmid = 211;
      resources = { cores = 4; memory = 4096; disk_gb = 128; };
      onboot = true; start = true;
      depends_on = [ "caddy" "authentik" ];
      ports = [ 80 ];
      interface = {
        terraform = {
          modules = [ "./terraform/nextcloud" ];
          variables = { storage_quota_gb = 100; };
        };
        db = { host = "postgresql.${domain}"; name = "nextcloud"; owner = "nextcloud"; port = 5432; };
        auth = oidc "https://cloud.${domain}/apps/user_oidc/code";
        proxy = { domain = "cloud.${domain}"; path = "/"; upstream = "10.10.0.11:80"; };
        health = health "phpfpm-nextcloud";
      };
    };

    monitoring = {
      ip = "10.10.0.12"; hostname = "monitoring.${domain}"; vmid = 212;
      resources = small; onboot = true; start = true;
      depends_on = [ "caddy" ];
      ports = [ 9090 3000 ];
      interface = {
        db = { host = "10.10.0.4"; name = "grafana"; owner = "grafana"; port = 5432; };
        auth = oidc "https://grafana.${domain}/login/generic_oauth";
        proxy = {
          grafana = { domain = "grafana.${domain}"; path = "/"; upstream = "10.10.0.12:3000"; };
          prometheus = { domain = "prometheus.${domain}"; path = "/"; upstream = "10.10.0.12:9090"; };
        };
        health = health "prometheus";
      };
    };

    media = {
      ip = "10.10.0.13"; hostname = "media.${domain}"; vmid = 213;
      resources = { cores = 2; memory = 4096; disk_gb = 64; };
      onboot = true; start = true;
      depends_on = [ "caddy" "authentik" ];
      ports = [ 8096 8989 ];
      interface = {
        dbs = {
          sonarr = { host = "10.10.0.4"; name = "sonarr"; owner = "sonarr"; port = 5432; additionaldbs = [ "sonarr-log" ]; };
          radarr = { host = "10.10.0.4"; name = "radarr"; owner = "radarr"; port = 5432; };
        };
        proxy = {
          jellyfin = {
            domain = "jellyfin.${domain}"; path = "/"; upstream = "10.10.0.13:8096";
            auth = oidc "https://jellyfin.${domain}/oidc/callback";
          };
          sonarr = {
            domain = "sonarr.${domain}"; path = "/"; upstream = "10.10.0.13:8989";
            auth = { type = "forward_auth"; provider = "authentik"; forward_auth_upstream = "10.10.0.6:9000"; };
          };
        };
        health = health "jellyfin";
      };
    };

    homepage = {
      ip = "10.10.0.14"; hostname = "homepage.${domain}"; vmid = 214;
      resources = small; onboot = true; start = true;
      depends_on = [ "caddy" "monitoring" ];
      ports = [ 8082 ];
      interface = {
        proxy = { domain = "www.${domain}"; path = "/"; upstream = "10.10.0.14:8082"; };
        health = health "homepage-dashboard" // { liveness = "curl -fsS http://localhost:8082/"; };
      };
    };

    wiki = {
      enable = false;
      ip = "10.10.0.15"; hostname = "wiki.${domain}"; vmid = 215;
      resources = small;
      depends_on = [ "caddy" ];
      interface.health = health "wiki-js";
    };
  };

  health_check_timeout = 300;
  retry_attempts = 3;
  retry_delay = 5;
  enable_rollback = true;
  enable_health_monitoring = true;
}
