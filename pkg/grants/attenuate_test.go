package grants

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

func mustGrants(t *testing.T, s string) Grants {
	t.Helper()
	var g Grants
	if err := json.Unmarshal([]byte(s), &g); err != nil {
		t.Fatal(err)
	}
	return g
}

func TestAttenuate(t *testing.T) {
	soon, later := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC), time.Date(2026, 11, 27, 13, 0, 0, 0, time.UTC)
	tests := []struct {
		name, g, ceiling, want string
	}{
		{"nothing above: nothing", `{"egress":[{"cidr":"10.0.0.0/8"}]}`, `{}`, `{"mode":"enforce"}`},
		{"narrower prefix wins", `{"egress":[{"cidr":"10.0.0.0/8","ports":[443]}]}`, `{"egress":[{"cidr":"10.1.0.0/16"}]}`,
			`{"mode":"enforce","egress":[{"cidr":"10.1.0.0/16","ports":[443]}]}`},
		{"disjoint prefixes", `{"egress":[{"cidr":"10.0.0.0/8"}]}`, `{"egress":[{"cidr":"192.168.0.0/16"}]}`, `{"mode":"enforce"}`},
		{"single address and cidr lists", `{"egress":[{"cidrs":["10.0.0.1","172.16.0.0/12"],"protocol":"tcp"}]}`, `{"egress":[{"cidrs":["10.0.0.0/24","172.16.5.0/24"]}]}`,
			`{"mode":"enforce","egress":[{"cidr":"10.0.0.1/32","protocol":"tcp"},{"cidr":"172.16.5.0/24","protocol":"tcp"}]}`},
		{"ports intersect", `{"egress":[{"cidr":"10.0.0.0/8","ports":["8000-8100",22]}]}`, `{"egress":[{"cidr":"10.0.0.0/8","ports":["8050-9000"]}]}`,
			`{"mode":"enforce","egress":[{"cidr":"10.0.0.0/8","ports":["8050-8100"]}]}`},
		{"ports disjoint", `{"egress":[{"cidr":"10.0.0.0/8","ports":[22]}]}`, `{"egress":[{"cidr":"10.0.0.0/8","ports":[443]}]}`, `{"mode":"enforce"}`},
		{"protocols", `{"egress":[{"cidr":"10.0.0.0/8","protocol":"tcp"},{"cidr":"10.0.0.0/8","protocol":"udp"}]}`, `{"egress":[{"cidr":"10.0.0.0/8","protocol":"TCP"}]}`,
			`{"mode":"enforce","egress":[{"cidr":"10.0.0.0/8","protocol":"tcp"}]}`},
		{"binary from either", `{"egress":[{"cidr":"10.0.0.0/8"}]}`, `{"egress":[{"cidr":"10.0.0.0/8","binary":"/usr/bin/git"}]}`,
			`{"mode":"enforce","egress":[{"cidr":"10.0.0.0/8","binary":"/usr/bin/git"}]}`},
		{"different binaries", `{"egress":[{"cidr":"10.0.0.0/8","binary":"/usr/bin/curl"}]}`, `{"egress":[{"cidr":"10.0.0.0/8","binary":"/usr/bin/git"}]}`, `{"mode":"enforce"}`},
		{"fqdn only against the same name", `{"egress":[{"fqdn":"api.example.com","ports":[443]},{"fqdn":"other.example.com"}]}`, `{"egress":[{"fqdn":"API.example.com."},{"cidr":"0.0.0.0/0"}]}`,
			`{"mode":"enforce","egress":[{"fqdn":"api.example.com","ports":[443]}]}`},
		{"v4 and v6 never meet", `{"egress":[{"cidr":"::/0"}]}`, `{"egress":[{"cidr":"0.0.0.0/0"}]}`, `{"mode":"enforce"}`},
		{"audit if either", `{"egress":[{"cidr":"10.0.0.0/8","audit":true}]}`, `{"egress":[{"cidr":"10.0.0.0/8"}]}`,
			`{"mode":"enforce","egress":[{"cidr":"10.0.0.0/8","audit":true}]}`},
		{"exec: a path the sender's glob names", `{"exec":[{"path":"/usr/bin/git"},{"path":"/usr/bin/curl"},{"path":"/opt/*"}]}`, `{"exec":[{"path":"/usr/bin/g*"},{"path":"/opt/tool"}]}`,
			`{"mode":"enforce","exec":[{"path":"/usr/bin/git"},{"path":"/opt/tool"}]}`},
		{"exec: two different globs are not compared", `{"exec":[{"path":"/usr/bin/g*"}]}`, `{"exec":[{"path":"/usr/bin/*"}]}`, `{"mode":"enforce"}`},
		{"unix: directories and paths", `{"unix":[{"path":"/run/app/*"},{"path":"/run/db.sock"},{"path":"@abstract"}]}`, `{"unix":[{"path":"/run/app/sub/*"},{"path":"/run/*"},{"path":"@abstract"}]}`,
			`{"mode":"enforce","unix":[{"path":"/run/app/sub/*"},{"path":"/run/app/*"},{"path":"/run/db.sock"},{"path":"@abstract"}]}`},
		{"unix: no climbing out", `{"unix":[{"path":"/run/app/../docker.sock"}]}`, `{"unix":[{"path":"/run/app/*"}]}`, `{"mode":"enforce"}`},
		{"denies add up, the earlier end wins", `{"exec_deny":["/usr/bin/ssh"],"valid_until":"` + later.Format(time.RFC3339) + `"}`, `{"exec_deny":["/usr/bin/nc"],"valid_until":"` + soon.Format(time.RFC3339) + `"}`,
			`{"mode":"enforce","exec_deny":["/usr/bin/ssh","/usr/bin/nc"],"valid_until":"` + soon.Format(time.RFC3339) + `"}`},
		{"audit only if both", `{"mode":"audit"}`, `{"mode":"enforce"}`, `{"mode":"enforce"}`},
		{"the stricter sandbox", `{"sandbox":"off"}`, `{"sandbox":"strict"}`, `{"mode":"enforce","sandbox":"strict"}`},
		{"a sandbox against none", `{"sandbox":"off"}`, `{}`, `{"mode":"enforce","sandbox":"default"}`},
		{"an unknown sandbox is strict", `{}`, `{"sandbox":"strickt"}`, `{"mode":"enforce","sandbox":"strict"}`},
		{"the shorter lifetime", `{"max_lifetime":"8h"}`, `{"max_lifetime":"90m"}`, `{"mode":"enforce","max_lifetime":"1h30m0s"}`},
		{"a lifetime against none", `{}`, `{"max_lifetime":"48h"}`, `{"mode":"enforce","max_lifetime":"24h0m0s"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Attenuate(mustGrants(t, tt.g), mustGrants(t, tt.ceiling))
			b, _ := json.Marshal(got)
			if want := mustGrants(t, tt.want); string(b) != mustJSON(want) {
				t.Errorf("got  %s\nwant %s", b, mustJSON(want))
			}
		})
	}
}

func mustJSON(g Grants) string {
	b, _ := json.Marshal(g)
	return string(b)
}

// TestAttenuateNeverMore: whatever g asks for, nothing in the result lies outside the ceiling
// (checked per address and port on a grid of samples).
func TestAttenuateNeverMore(t *testing.T) {
	ceiling := mustGrants(t, `{"egress":[{"cidr":"10.1.0.0/16","ports":["1000-2000"],"protocol":"tcp"},{"cidr":"10.2.3.4"}]}`)
	g := mustGrants(t, `{"egress":[{"cidr":"0.0.0.0/0"},{"cidr":"10.0.0.0/8","ports":["1500-3000"]},{"cidr":"10.2.0.0/16","protocol":"udp","ports":[53]}]}`)
	got := Attenuate(g, ceiling)
	allows := func(gs Grants, addr string, port uint16, proto string) bool {
		for _, e := range gs.Egress {
			p, _ := intersectProto(e.Protocol, proto)
			if e.Protocol != "" && p != proto {
				continue
			}
			okPort := len(e.Ports) == 0
			for _, r := range e.Ports {
				okPort = okPort || (r.Lo <= port && port <= r.Hi)
			}
			for _, pre := range prefixes(e) {
				if okPort && pre.Contains(mustAddr(addr)) {
					return true
				}
			}
		}
		return false
	}
	for _, addr := range []string{"10.1.2.3", "10.2.3.4", "10.2.3.5", "10.3.0.1", "8.8.8.8"} {
		for _, port := range []uint16{53, 999, 1000, 1500, 2000, 2001, 3000} {
			for _, proto := range []string{"tcp", "udp"} {
				want := allows(g, addr, port, proto) && allows(ceiling, addr, port, proto)
				if have := allows(got, addr, port, proto); have != want {
					t.Errorf("%s %s:%d: attenuated %v, both %v", proto, addr, port, have, want)
				}
			}
		}
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

// TestAttenuateDigestsAndListen: a content pinned by either side stays pinned (two different ones
// grant nothing), and listen rules are intersected like egress ports.
func TestAttenuateDigestsAndListen(t *testing.T) {
	g := mustGrants(t, `{"exec":[{"path":"/opt/a","sha256":"aa"},{"path":"/opt/b"},{"path":"/opt/c","sha256":"cc"},{"sha256":"ee"}],
		"listen":[{"ports":["8000-9000"],"protocol":"tcp"},{"ports":[53]}]}`)
	ceiling := mustGrants(t, `{"exec":[{"path":"/opt/a"},{"path":"/opt/b","sha256":"bb"},{"path":"/opt/c","sha256":"dd"}],
		"listen":[{"ports":["8080","9500"],"protocol":"any"}]}`)
	got := Attenuate(g, ceiling)
	// Content alone against a path: that path with that content.
	wantExec := []Exec{{Path: "/opt/a", SHA256: "aa"}, {Path: "/opt/b", SHA256: "bb"}, {Path: "/opt/a", SHA256: "ee"}}
	if !reflect.DeepEqual(got.Exec, wantExec) {
		t.Errorf("exec %+v, want %+v", got.Exec, wantExec)
	}
	wantListen := []Listen{{Ports: []PortRange{{Lo: 8080, Hi: 8080}}, Protocol: "tcp"}}
	if !reflect.DeepEqual(got.Listen, wantListen) {
		t.Errorf("listen %+v, want %+v", got.Listen, wantListen)
	}
	if none := Attenuate(g, Grants{}); len(none.Listen) != 0 {
		t.Errorf("a ceiling without listen rules: %+v", none.Listen)
	}
}
