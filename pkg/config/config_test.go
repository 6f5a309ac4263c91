package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/pkg/panics"
)

func TestEmbeddedDefaults(t *testing.T) {
	l, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	if l.BPF.PinDir != "/sys/fs/bpf/tether" || l.API.Socket != "/run/tether/tether.sock" || l.Cgroup.AgentParents[0] != "tether" {
		t.Errorf("defaults: %+v", l.Config)
	}
	if l.Policy.Dir != "" || l.Policy.Bundle != nil || l.Policy.Timezone != "UTC" {
		t.Errorf("policy %+v: want the shipped policies", l.Policy)
	}
	if l.LaunchUIDs.First != 2130706432 || l.LaunchUIDs.Last != 2130771967 {
		t.Errorf("launch uids %+v: want the parsed default range 2130706432-2130771967", l.LaunchUIDs)
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, yaml, want string
	}{
		{"unknown key with its line", "bpf:\n  pin_dir: /sys/fs/bpf/x\n  exec_mod: lsm\n", `[3:3] unknown field "exec_mod"`},
		{"wrong type", "bpf:\n  allow_sample: many\n", "allow_sample"},
		{"exec mode", "bpf:\n  exec_mode: maybe\n", `cfg.yaml:2: bpf.exec_mode: "maybe"`},
		{"ring buffer", "bpf:\n  ring_buffer_bytes: 5000\n", "bpf.ring_buffer_bytes: 5000"},
		{"unknown cgroup", "bpf:\n  unknown_cgroup: maybe\n", "bpf.unknown_cgroup"},
		{"launch outside parents", "cgroup:\n  agent_parents: [a]\n  launch_parent: b\n", "cfg.yaml:3: cgroup.launch_parent"},
		{"dotdot parent", "cgroup:\n  agent_parents: [../x]\n  launch_parent: ../x\n", "without .. components"},
		{"relative socket", "api:\n  socket: tether.sock\n", "api.socket"},
		{"long socket", "api:\n  socket: /" + strings.Repeat("s", 120) + "\n", "longer than a unix socket path"},
		{"launch rule", "launch:\n  - ids: [spiffe://x/*]\n", "needs ids and uids or gids"},
		{"launch pattern", "launch:\n  - ids: [agent]\n    uids: [1000]\n", "want a SPIFFE ID pattern"},
		{"launch root key", "launch:\n  - ids: [spiffe://x/*]\n    uids: [0]\n    root: yes please\n", "launch"},
		{"uid range order", "confinement:\n  uids: 5000-4000\n", "cfg.yaml:2: confinement.uids"},
		{"uid range zero", "confinement:\n  uids: 0-4000\n", "confinement.uids"},
		{"uid range form", "confinement:\n  uids: \"5000\"\n", "want first-last"},
		{"hide relative", "confinement:\n  hide: [run/x]\n", "confinement.hide"},
		{"hide root", "confinement:\n  hide: [/]\n", "other than /"},
		{"grants moved to policy", "grants:\n  spiffe://x.org/a:\n    mode: audit\n", `unknown field "grants"`},
		{"policy dir and bundle", "policy:\n  dir: /etc/p\n  bundle:\n    service: http://x\n    resource: /b\n", "cfg.yaml:2: policy: give a dir or a bundle"},
		{"relative policy dir", "policy:\n  dir: p\n", "policy.dir"},
		{"data dir with a dir", "policy:\n  dir: /etc/p\n  data_dir: /etc/d\n", "policy.data_dir: replaces the shipped policies' data"},
		{"relative data dir", "policy:\n  data_dir: d\n", `policy.data_dir: "d": must be an absolute path`},
		{"bundle URL", "policy:\n  bundle:\n    service: ftp://x\n    resource: /b\n", "cfg.yaml:3: policy.bundle.service"},
		{"bundle delay", "policy:\n  bundle:\n    service: http://x\n    resource: /b\n    min_delay: 1m\n    max_delay: 10s\n", "shorter than min_delay"},
		{"bundle delay syntax", "policy:\n  bundle:\n    service: http://x\n    resource: /b\n    min_delay: soon\n", `invalid duration "soon"`},
		{"bundle two credentials", "policy:\n  bundle:\n    service: https://x\n    resource: /b\n    credentials:\n      bearer: {token: a}\n      client_tls: {cert: /c}\n", "give one kind of credentials, not 2"},
		{"bundle unknown credentials", "policy:\n  bundle:\n    service: https://x\n    resource: /b\n    credentials:\n      beerer: {token: a}\n", `"beerer": want one of bearer, client_tls`},
		{"bundle key file", "policy:\n  bundle:\n    service: http://x\n    resource: /b\n    public_key_file: /nonexistent\n    key_id: k\n", "public_key_file"},
		{"pod selector", "identity:\n  trust_domains: [cluster.local]\n  kubernetes:\n    trust_domain: cluster.local\n    pod_selector: \"a in (b\"\n", "identity.kubernetes.pod_selector"},
		{"timezone", "policy:\n  timezone: Mars/Olympus\n", "policy.timezone"},
		{"dns server", "dns:\n  server: 127.0.0.1\n", "dns.server"},
		{"dns remote loopback", "dns:\n  proxy:\n    remote_addresses: [127.0.0.1]\n", "cfg.yaml:3: dns.proxy.remote_addresses: 127.0.0.1: want an address"},
		{"dns remote two v4", "dns:\n  proxy:\n    remote_addresses: [10.0.0.1, 10.0.0.2]\n", "at most one IPv4 and one IPv6"},
		{"dns remote not an address", "dns:\n  proxy:\n    remote_addresses: [node]\n", `"node" is not an IP address`},
		{"trust domain", "identity:\n  trust_domains: [Example.org]\n", "cfg.yaml:2: identity.trust_domains"},
		{"static id", "identity:\n  static:\n    - id: agent\n      uid: 1000\n", "cfg.yaml:3: identity.static[0].id"},
		{"static selects nothing", "identity:\n  static:\n    - id: spiffe://x.org/a\n", "needs a cgroup, unit or uid"},
		{"static pattern", "identity:\n  static:\n    - id: spiffe://x.org/a\n      cgroup: a/[\n", "identity.static[0].cgroup"},
		{"static trust domain", "identity:\n  trust_domains: [y.org]\n  static:\n    - id: spiffe://x.org/a\n      uid: 1\n", `trust domain "x.org" is not configured`},
		{"spire socket", "identity:\n  spire:\n    admin_socket: admin.sock\n    cgroups: [a/*]\n", "identity.spire.admin_socket"},
		{"kubernetes trust domain", "identity:\n  kubernetes:\n    node_name: n\n", "identity.kubernetes.trust_domain"},
		{"spire cgroups", "identity:\n  spire:\n    admin_socket: /run/spire/admin.sock\n", "identity.spire.cgroups"},
		{"credential ttl", "credentials:\n  ttl: 1s\n", "cfg.yaml:2: credentials.ttl"},
		{"credential dir", "credentials:\n  dir: creds\n", "credentials.dir"},
		{"credential listen", "credentials:\n  listen: 8474\n", "credentials.listen"},
		{"escalation format", "telemetry:\n  escalation_webhook: http://am:9093\n  escalation_format: slack\n", "cfg.yaml:3: telemetry.escalation_format"},
		{"escalation resolve", "telemetry:\n  escalation_resolve_after: 1s\n", "telemetry.escalation_resolve_after: 1s: want 1m to 168h"},
		{"http sink format", "decision_log:\n  http:\n    url: https://logs.example\n    format: csv\n", `decision_log.http.format: "csv": want json or ndjson`},
		{"spiffe id label", "telemetry:\n  spiffe_id_label: short\n", `telemetry.spiffe_id_label: "short": want full, trust_domain or none`},
		{"log level", "log:\n  level: loud\n", "log.level"},
		{"all errors at once", "log:\n  level: loud\n  format: xml\n", "log.format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("cfg.yaml", []byte(tt.yaml))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v\nwant one containing %q", err, tt.want)
			}
		})
	}
}

func TestParsePolicyBundle(t *testing.T) {
	l, err := Parse("cfg.yaml", []byte("policy:\n  bundle:\n    service: http://127.0.0.1:8181\n    resource: /bundles/tether.tar.gz\n    min_delay: 10s\n    max_delay: 1m\nenv:\n  environment: production\n  labels: {region: eu}\n"))
	if err != nil {
		t.Fatal(err)
	}
	b := l.Policy.Bundle
	if b.Service != "http://127.0.0.1:8181" || b.MinDelay != 10*time.Second || b.MaxDelay != time.Minute || l.Env.Environment != "production" || l.Env.Labels["region"] != "eu" {
		t.Errorf("%+v %+v", b, l.Env)
	}
}

// FuzzParse: any bytes give a configuration or an error, never a panic.
func FuzzParse(f *testing.F) {
	f.Add(DefaultYAML)
	f.Add([]byte("bpf:\n  exec_mode: lsm\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		before := panics.Counts()[boundary]
		l, err := Parse("fuzz.yaml", b)
		if (l == nil) == (err == nil) {
			t.Fatalf("a configuration and an error, or neither: %v %v", l, err)
		}
		if panics.Counts()[boundary] != before {
			t.Fatalf("the decoder panicked (refused: %v)", err)
		}
	})
}

// TestParseRefusesWhatCrashedTheDecoder: files on which goccy/go-yaml's decoder panicked (found by
// FuzzParse; a SIGHUP with one of them in place ended tetherd) are refused with the line and why,
// before they are decoded; whatever still panics in the decoder is refused too.
func TestParseRefusesWhatCrashedTheDecoder(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"cgroup:\n  agent_parents: !00\n", `crash.yaml:2: the YAML tag "!00"`},
		{"cgroup:\n agent_parents: !00\n0:\n", `crash.yaml:2: the YAML tag "!00"`},
		{"api:\n  socket: !custom /run/x.sock\n", `crash.yaml:2: the YAML tag "!custom"`},
	} {
		l, err := Parse("crash.yaml", []byte(tt.in))
		if err == nil || !strings.Contains(err.Error(), tt.want) || l != nil {
			t.Errorf("%q: %v, want an error with %q", tt.in, err, tt.want)
		}
	}
	if _, err := Parse("plain.yaml", []byte("api:\n  socket: !!str /run/tether/x.sock\n")); err != nil {
		t.Errorf("a core schema tag: %v", err)
	}
	if n := panics.Counts()[boundary]; n != 0 {
		t.Errorf("the decoder still panicked %d times", n)
	}
}

// A file that is not a regular file, or never ends, is refused without being waited on or read
// into memory: a FIFO, a link to /dev/zero, a directory, a file past the size limit.
func TestLoadRefusesWhatIsNotAConfigurationFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo.yaml")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	zero := filepath.Join(dir, "zero.yaml")
	if err := os.Symlink("/dev/zero", zero); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, append([]byte("# "), make([]byte, maxFileBytes)...), 0o600); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{fifo: "not a regular file", zero: "not a regular file", dir: "not a regular file",
		big: "larger than 4 MiB", filepath.Join(dir, "missing.yaml"): "no such file"} {
		done := make(chan error, 1)
		go func() { _, err := Load(path); done <- err }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Load(%s): %v, want an error saying %q", filepath.Base(path), err, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("Load(%s) did not return", filepath.Base(path))
		}
	}
}

// TestLoadParsesOnce: what the checks parse (the time zone, the decision log's mask, the pod
// selector, the exec mode) comes with the configuration, for the daemon to use as it is.
func TestLoadParsesOnce(t *testing.T) {
	l, err := Parse("test", []byte(`
bpf: {exec_mode: signal}
policy: {timezone: Europe/Paris}
decision_log: {mask: [/input/agent/labels]}
identity: {kubernetes: {trust_domain: cluster.local, pod_selector: "tether.dev/agent=true"}}
`))
	if err != nil {
		t.Fatal(err)
	}
	if l.Location == nil || l.Location.String() != "Europe/Paris" || len(l.Mask) != 1 || l.PodSelector == nil ||
		l.PodSelector.String() != "tether.dev/agent=true" || l.BPF.ExecMode != "signal" {
		t.Errorf("parsed: location %v, mask %v, selector %v, exec mode %q", l.Location, l.Mask, l.PodSelector, l.BPF.ExecMode)
	}
}

// TestHiddenPaths: a launched agent does not see tether's admin socket, key, kill state,
// configuration file, the SPIRE sockets or what confinement.hide adds; it does see its own
// socket; relative and repeated paths are dropped.
func TestHiddenPaths(t *testing.T) {
	c := &Loaded{Source: "/etc/tether/tether.yaml"}
	c.API.Socket, c.API.AgentSocket = "/run/tether/api.sock", "/run/tether/agent.sock"
	c.API.SensitiveSockets = []string{"/run/docker.sock", "/run/tether/agent.sock"}
	c.Credentials.KeyFile, c.Kill.StateFile = "/var/lib/tether/key.pem", "/var/lib/tether/kills.json"
	c.Identity.SPIRE = &SPIRE{AdminSocket: "/run/spire/admin.sock", WorkloadSocket: "/run/spire/agent.sock"}
	c.Confinement.Hide = []string{"/srv/secrets", "relative", "/run/docker.sock"}
	got := c.HiddenPaths()
	want := []string{"/run/tether/api.sock", "/var/lib/tether/key.pem", "/var/lib/tether/kills.json", "/run/docker.sock",
		"/run/spire/admin.sock", "/run/spire/agent.sock", "/etc/tether/tether.yaml", "/srv/secrets"}
	if !slices.Equal(got, want) {
		t.Fatalf("hidden %q\nwant   %q", got, want)
	}
}

func TestRemoteAddresses(t *testing.T) {
	t.Setenv(RemoteAddressesEnv, "10.1.2.3,fd00::7")
	v4, v6, err := RemoteAddresses(nil)
	if err != nil || v4.String() != "10.1.2.3" || v6.String() != "fd00::7" {
		t.Fatalf("from the environment: %v %v %v", v4, v6, err)
	}
	v4, v6, err = RemoteAddresses([]string{"::ffff:10.9.9.9"})
	if err != nil || v4.String() != "10.9.9.9" || v6.IsValid() {
		t.Fatalf("configured (the environment unused): %v %v %v", v4, v6, err)
	}
	t.Setenv(RemoteAddressesEnv, "0.0.0.0")
	if _, _, err := RemoteAddresses(nil); err == nil || !strings.Contains(err.Error(), "$"+RemoteAddressesEnv) {
		t.Fatalf("an unspecified address from the environment: %v", err)
	}
}
