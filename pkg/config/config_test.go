package config

import (
	"strings"
	"testing"
)

func TestEmbeddedDefaults(t *testing.T) {
	l, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	if l.BPF.PinDir != "/sys/fs/bpf/tether" || l.API.Socket != "/run/tether/tether.sock" || l.Cgroup.AgentParents[0] != "tether" {
		t.Errorf("defaults: %+v", l.Config)
	}
	if _, ok := l.Grants["spiffe://tether.local/demo/agent"]; !ok {
		t.Error("the demo identity has no grants")
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
		{"bad SPIFFE ID", "grants:\n  not-an-id:\n    mode: audit\n", "cfg.yaml:3: grants[not-an-id]"},
		{"grants that do not compile, with line", "log:\n  level: info\ngrants:\n  spiffe://x.org/a:\n    egress:\n      - cidr: 10.0.0.1/8\n", "cfg.yaml:5: grants[spiffe://x.org/a]: egress[0]: cidr \"10.0.0.1/8\" has host bits set"},
		{"port syntax", "grants:\n  spiffe://x.org/a:\n    egress:\n      - cidr: 10.0.0.0/8\n        ports: [\"9-1\"]\n", "start is above end"},
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

func TestParsePorts(t *testing.T) {
	l, err := Parse("cfg.yaml", []byte("grants:\n  spiffe://x.org/a:\n    egress:\n      - cidr: 10.0.0.0/8\n        ports: [443, \"8000-8100\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	got := l.Grants["spiffe://x.org/a"].Egress[0].Ports
	if len(got) != 2 || got[0].Lo != 443 || got[0].Hi != 443 || got[1].Lo != 8000 || got[1].Hi != 8100 {
		t.Errorf("ports %v", got)
	}
}

// FuzzParse: any bytes give a configuration or an error, never a panic.
func FuzzParse(f *testing.F) {
	f.Add(DefaultYAML)
	f.Add([]byte("bpf:\n  exec_mode: lsm\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		Parse("fuzz.yaml", b)
	})
}
