package compile

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/procfs"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
)

// fakeFiles is a file system of a few paths.
type fakeFiles struct {
	files    map[string]dataplane.FileID
	dirs     map[string]bool
	writable map[string]bool
}

func (f fakeFiles) Stat(path string) (FileStat, error) {
	if id, ok := f.files[path]; ok {
		return FileStat{ID: id, Regular: true, Changed: int64(id.Ino)}, nil
	}
	if f.dirs[path] {
		return FileStat{ID: dataplane.FileID{Dev: 1, Ino: 999}}, nil
	}
	return FileStat{}, &os.PathError{Op: "stat", Path: path, Err: os.ErrNotExist}
}

// Resolve knows one symbolic link: /var/run is /run.
func (f fakeFiles) Resolve(path string) string {
	if rest, ok := strings.CutPrefix(path, "/var/run/"); ok {
		return "/run/" + rest
	}
	return path
}

// Digest of a fake file is the digest of its path.
func (f fakeFiles) Digest(path string) (FileStat, [sha256.Size]byte, error) {
	st, err := f.Stat(path)
	return st, sha256.Sum256([]byte(path)), err
}

func (f fakeFiles) Glob(pattern string) ([]string, error) {
	var out []string
	for p := range f.files {
		if ok, _ := matchPath(pattern, p); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

func matchPath(pattern, p string) (bool, error) {
	prefix, _ := strings.CutSuffix(pattern, "*")
	return strings.HasPrefix(p, prefix) && !strings.Contains(p[len(prefix):], "/"), nil
}

func (f fakeFiles) WorldWritable(dir string) bool { return f.writable[dir] }

var files = fakeFiles{
	files: map[string]dataplane.FileID{
		"/usr/bin/curl": {Dev: 1, Ino: 10},
		"/usr/bin/git":  {Dev: 1, Ino: 11},
		"/usr/bin/sh":   {Dev: 1, Ino: 12},
		"/opt/x/a":      {Dev: 2, Ino: 1},
		"/opt/x/b":      {Dev: 2, Ino: 2},
		"/opt/y/sh":     {Dev: 1, Ino: 12}, // another name for /usr/bin/sh
		"/opt/y/tool":   {Dev: 3, Ino: 1},
	},
	dirs:     map[string]bool{"/usr/bin": true},
	writable: map[string]bool{"/tmp": true},
}

func pr(s string) netip.Prefix {
	p, err := parsePrefix(s)
	if err != nil {
		panic(err)
	}
	return p
}

func ports(lo, hi uint16, proto dataplane.Proto) dataplane.PortRule {
	return dataplane.PortRule{Proto: proto, Lo: lo, Hi: hi}
}

func TestCompileEgress(t *testing.T) {
	all := ports(0, 65535, dataplane.ProtoAny)
	curl := dataplane.FileID{Dev: 1, Ino: 10}
	tests := []struct {
		name   string
		egress []grants.Egress
		want   []dataplane.Egress
	}{{
		name:   "address and defaults",
		egress: []grants.Egress{{CIDR: "10.0.0.1"}},
		want:   []dataplane.Egress{{Prefix: pr("10.0.0.1/32"), Ports: []dataplane.PortRule{all}}},
	}, {
		name: "covering prefix ports are merged into the more specific one",
		egress: []grants.Egress{
			{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}, Protocol: "tcp"},
			{CIDR: "10.1.0.0/16", Ports: []grants.PortRange{{Lo: 22, Hi: 22}}, Protocol: "tcp"},
		},
		want: []dataplane.Egress{
			{Prefix: pr("10.0.0.0/8"), Ports: []dataplane.PortRule{ports(443, 443, dataplane.ProtoTCP)}},
			{Prefix: pr("10.1.0.0/16"), Ports: []dataplane.PortRule{ports(22, 22, dataplane.ProtoTCP), ports(443, 443, dataplane.ProtoTCP)}},
		},
	}, {
		name: "an IPv6 prefix spanning the IPv4 space gets a guard that grants IPv4 nothing",
		egress: []grants.Egress{
			{CIDR: "::/0", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}},
			{CIDR: "192.0.2.0/24", Ports: []grants.PortRange{{Lo: 80, Hi: 80}}},
		},
		want: []dataplane.Egress{
			{Prefix: pr("::/0"), Ports: []dataplane.PortRule{ports(443, 443, dataplane.ProtoAny)}},
			{Prefix: pr("::ffff:0:0/96"), Ports: nil},
			{Prefix: pr("192.0.2.0/24"), Ports: []dataplane.PortRule{ports(80, 80, dataplane.ProtoAny)}},
		},
	}, {
		name:   "IPv4 written as v4-mapped IPv6 is IPv4",
		egress: []grants.Egress{{CIDR: "::ffff:192.0.2.0/120", Protocol: "udp", Ports: []grants.PortRange{{Lo: 53, Hi: 53}}}},
		want:   []dataplane.Egress{{Prefix: pr("192.0.2.0/24"), Ports: []dataplane.PortRule{ports(53, 53, dataplane.ProtoUDP)}}},
	}, {
		name: "0.0.0.0/0 is the IPv4 space, and is what the guard carries",
		egress: []grants.Egress{
			{CIDR: "0.0.0.0/0", Ports: []grants.PortRange{{Lo: 53, Hi: 53}}},
			{CIDR: "::/0", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}},
		},
		want: []dataplane.Egress{
			{Prefix: pr("::/0"), Ports: []dataplane.PortRule{ports(443, 443, dataplane.ProtoAny)}},
			{Prefix: pr("0.0.0.0/0"), Ports: []dataplane.PortRule{ports(53, 53, dataplane.ProtoAny)}},
		},
	}, {
		name: "overlapping and adjacent ranges join; narrower rules inside wider ones go",
		egress: []grants.Egress{{CIDR: "10.0.0.0/8", Protocol: "tcp", Ports: []grants.PortRange{{Lo: 80, Hi: 90}, {Lo: 91, Hi: 100}, {Lo: 85, Hi: 95}}},
			{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}},
			{CIDR: "10.0.0.0/8", Protocol: "tcp", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}},
			{CIDR: "10.0.0.0/8", Protocol: "tcp", Binary: "/usr/bin/curl", Ports: []grants.PortRange{{Lo: 443, Hi: 443}, {Lo: 8443, Hi: 8443}}},
		},
		want: []dataplane.Egress{{Prefix: pr("10.0.0.0/8"), Ports: []dataplane.PortRule{
			ports(443, 443, dataplane.ProtoAny), ports(80, 100, dataplane.ProtoTCP),
			{Proto: dataplane.ProtoTCP, Lo: 8443, Hi: 8443, Binary: curl},
		}}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := Compile(context.Background(), grants.Grants{Egress: tt.egress}, Options{Files: files})
			if err := res.Err(); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(res.RuleSet.Egress, tt.want) {
				t.Errorf("got\n%v\nwant\n%v", res.RuleSet.Egress, tt.want)
			}
		})
	}
}

func TestCompileErrors(t *testing.T) {
	many := make([]grants.PortRange, 0, 17)
	for i := range 17 {
		many = append(many, grants.PortRange{Lo: uint16(1000 + 2*i), Hi: uint16(1000 + 2*i)})
	}
	tests := []struct {
		name string
		g    grants.Grants
		want string
	}{
		{"mode", grants.Grants{Mode: "permissive"}, `mode: "permissive" is not a mode`},
		{"fqdn without a resolver is refused, not dropped", grants.Grants{Egress: []grants.Egress{{FQDN: "example.com"}}}, `egress[0]: fqdn "example.com": no DNS resolver`},
		{"missing cidr", grants.Grants{Egress: []grants.Egress{{}}}, "egress[0]: needs a cidr, cidrs or an fqdn"},
		{"cidr and fqdn", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", FQDN: "x"}}}, "more than one of cidr, cidrs and fqdn"},
		{"cidr and cidrs", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", CIDRs: []string{"10.1.0.0/16"}}}}, "more than one"},
		{"empty cidrs", grants.Grants{Egress: []grants.Egress{{CIDRs: []string{}}}}, "egress[0]: cidrs is empty"},
		{"one bad prefix of cidrs", grants.Grants{Egress: []grants.Egress{{CIDRs: []string{"10.0.0.0/8", "10.0.0.300/8"}}}}, `egress[0].cidrs[1]: cidr "10.0.0.300/8"`},
		{"missing exec path", grants.Grants{Exec: []grants.Exec{{Path: "/usr/bin/kubectl"}}}, `exec[0]: path: "/usr/bin/kubectl" does not exist`},
		{"missing binary", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Binary: "/usr/bin/missing"}}}, "does not exist"},
		{"bad cidr", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.300/8"}}}, `cidr "10.0.0.300/8"`},
		{"host bits", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.1/8"}}}, "did you mean 10.0.0.0/8"},
		{"zone", grants.Grants{Egress: []grants.Egress{{CIDR: "fe80::1%eth0"}}}, "zones"},
		{"protocol", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Protocol: "sctp"}}}, `protocol "sctp": the kernel matches`},
		{"protocol case", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Protocol: "TCP"}}}, `protocol "TCP": the kernel matches tcp`},
		{"empty ports", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{}}}}, "ports is empty"},
		{"reversed range", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 9, Hi: 1}}}}}, "start is above end"},
		{"too many port rules", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Ports: many}}}, "17 distinct port rules"},
		{"inherited rules count", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Ports: many[:9]}, {CIDR: "10.1.0.0/16", Ports: many[9:]}}}, "egress to 10.1.0.0/16: 17"},
		{"relative binary", grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Binary: "curl"}}}, "absolute"},
		{"exec directory", grants.Grants{Exec: []grants.Exec{{Path: "/usr/bin"}}}, "not a regular file"},
		{"exec relative", grants.Grants{Exec: []grants.Exec{{Path: "bin/sh"}}}, "absolute"},
		{"exec class", grants.Grants{Exec: []grants.Exec{{Path: "/usr/bin/[^x]url"}}}, "only * and ? are supported"},
		{"exec alternatives", grants.Grants{Exec: []grants.Exec{{Path: "/usr/bin/{curl,git}"}}}, "only * and ?"},
		{"exec_deny class", grants.Grants{ExecDeny: []string{"/usr/bin/[a-z]*"}}, "exec_deny[0]: path"},
		{"unix relative", grants.Grants{Unix: []grants.Unix{{Path: "run/x.sock"}}}, "absolute"},
		{"unix dotdot", grants.Grants{Unix: []grants.Unix{{Path: "/run/../x.sock"}}}, "clean path"},
		{"unix wildcard", grants.Grants{Unix: []grants.Unix{{Path: "/run/*.sock"}}}, "trailing /*"},
		{"unix too long", grants.Grants{Unix: []grants.Unix{{Path: "/" + strings.Repeat("a", 107)}}}, "longer than 107"},
		{"abstract wildcard", grants.Grants{Unix: []grants.Unix{{Path: "@x*"}}}, "exactly"},
		{"errors are all reported", grants.Grants{Mode: "x", Exec: []grants.Exec{{Path: "y"}}}, "exec[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Compile(context.Background(), tt.g, Options{Files: files}).Err()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestCompileCIDRs: a rule with several prefixes is the same as one rule per prefix, and a
// malformed prefix is refused alone.
func TestCompileCIDRs(t *testing.T) {
	ports := []grants.PortRange{{Lo: 443, Hi: 443}}
	many := Compile(context.Background(), grants.Grants{Egress: []grants.Egress{
		{CIDRs: []string{"10.0.0.0/8", "192.0.2.0/24", "bad", "2001:db8::/32"}, Ports: ports, Protocol: "tcp"},
	}}, Options{Files: files})
	one := Compile(context.Background(), grants.Grants{Egress: []grants.Egress{
		{CIDR: "10.0.0.0/8", Ports: ports, Protocol: "tcp"},
		{CIDR: "192.0.2.0/24", Ports: ports, Protocol: "tcp"},
		{CIDR: "2001:db8::/32", Ports: ports, Protocol: "tcp"},
	}}, Options{Files: files})
	if !reflect.DeepEqual(many.RuleSet, one.RuleSet) {
		t.Errorf("cidrs\n%v\nseparate rules\n%v", many.RuleSet.Egress, one.RuleSet.Egress)
	}
	if len(many.Refused) != 1 || many.Refused[0].Rule != "egress[0].cidrs[2]" {
		t.Errorf("refused: %v", many.Refused)
	}
}

// TestCompileExecDeny: a denied file stays denied under any name: another path of the same
// file, or a glob that covers it; the other files of the glob are granted.
func TestCompileExecDeny(t *testing.T) {
	res := Compile(context.Background(), grants.Grants{
		ExecDeny: []string{"/usr/bin/sh", "/usr/bin/missing"},
		Exec:     []grants.Exec{{Path: "/opt/y/*"}, {Path: "/usr/bin/sh"}, {Path: "/usr/bin/git"}},
	}, Options{Files: files})
	var granted []dataplane.FileID
	for _, e := range res.RuleSet.Exec {
		granted = append(granted, e.File)
	}
	want := []dataplane.FileID{{Dev: 1, Ino: 11}, {Dev: 3, Ino: 1}}
	if !reflect.DeepEqual(granted, want) {
		t.Errorf("granted %v, want %v", granted, want)
	}
	reasons := fmt.Sprint(res.Refused)
	if len(res.Refused) != 2 || !strings.Contains(reasons, `exec[0]: "/opt/y/sh" is the same file as "/usr/bin/sh"`) ||
		!strings.Contains(reasons, `exec[1]: "/usr/bin/sh" is the same file`) {
		t.Errorf("refused: %v", res.Refused)
	}
}

func TestCompileExecAndUnix(t *testing.T) {
	res := Compile(context.Background(), grants.Grants{
		Mode: "audit",
		Exec: []grants.Exec{{Path: "/usr/bin/curl"}, {Path: "/opt/x/*"}, {Path: "/usr/bin/curl", Audit: true}, {Path: "/usr/bin/kubectl"}, {Path: "/usr/bin/git", Audit: true}},
		Unix: []grants.Unix{{Path: "/run/a.sock"}, {Path: "/run/agent/*"}, {Path: "@name", Audit: true}, {Path: "/tmp/x.sock"}},
		Egress: []grants.Egress{
			{CIDR: "10.0.0.0/8", Binary: "/usr/bin/missing"},
			{CIDR: "192.0.2.0/24"},
		},
	}, Options{Files: files})
	rs := res.RuleSet
	if rs.Mode != dataplane.ModeAudit {
		t.Errorf("mode %v", rs.Mode)
	}
	// curl granted twice, once silently: silently wins. git only audits.
	wantExec := []dataplane.ExecRule{{File: dataplane.FileID{Dev: 1, Ino: 10}, Changed: 10}, {File: dataplane.FileID{Dev: 1, Ino: 11}, Changed: 11, Audit: true},
		{File: dataplane.FileID{Dev: 2, Ino: 1}, Changed: 1}, {File: dataplane.FileID{Dev: 2, Ino: 2}, Changed: 2}}
	if !reflect.DeepEqual(rs.Exec, wantExec) {
		t.Errorf("exec %v, want %v", rs.Exec, wantExec)
	}
	wantUnix := []dataplane.Unix{{Path: "/run/a.sock"}, {Path: "/run/agent/", Prefix: true}, {Path: "/tmp/x.sock"}, {Path: "@name", Audit: true}}
	if !reflect.DeepEqual(rs.Unix, wantUnix) {
		t.Errorf("unix %v, want %v", rs.Unix, wantUnix)
	}
	// The refused rules are out, the rest is in.
	if len(rs.Egress) != 1 || rs.Egress[0].Prefix != pr("192.0.2.0/24") {
		t.Errorf("egress %v", rs.Egress)
	}
	refused := res.Err().Error()
	for _, w := range []string{`exec[3]: path: "/usr/bin/kubectl" does not exist`, `egress[0]: binary: "/usr/bin/missing" does not exist`} {
		if !strings.Contains(refused, w) {
			t.Errorf("refusals %q lack %q", refused, w)
		}
	}
	if len(res.Refused) != 2 {
		t.Errorf("refused %v", res.Refused)
	}
	if joined := strings.Join(res.Warnings, "\n"); !strings.Contains(joined, "world-writable directory /tmp") {
		t.Errorf("warnings %q", joined)
	}
}

func TestAuditPortRules(t *testing.T) {
	res := Compile(context.Background(), grants.Grants{Egress: []grants.Egress{
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}, Audit: true},
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}, Protocol: "tcp"},
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 80, Hi: 80}}, Protocol: "tcp", Audit: true},
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 1, Hi: 100}}, Protocol: "tcp"},
	}}, Options{Files: files})
	// The audit rule for tcp 80 is inside the silent 1-100 and goes; the audit rule for 443 of
	// any protocol stays (it covers udp 443, which nothing else allows).
	want := []dataplane.PortRule{ports(1, 100, dataplane.ProtoTCP), ports(443, 443, dataplane.ProtoTCP),
		{Proto: dataplane.ProtoAny, Lo: 443, Hi: 443, Audit: true}}
	if got := res.RuleSet.Egress[0].Ports; !reflect.DeepEqual(got, want) {
		t.Errorf("got %v\nwant %v", got, want)
	}
}

type fakeResolver map[string][]netip.Addr

func (f fakeResolver) Lookup(_ context.Context, name string) ([]netip.Addr, time.Duration, error) {
	a, ok := f[name]
	if !ok {
		return nil, 0, errors.New("no such name")
	}
	return a, 30 * time.Second, nil
}

func TestFQDN(t *testing.T) {
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	r := fakeResolver{"api.example.com": {netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("2001:db8::10")}}
	res := Compile(context.Background(), grants.Grants{Egress: []grants.Egress{
		{FQDN: "api.example.com", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}, Protocol: "tcp"},
		{FQDN: "gone.example.com"},
	}}, Options{Files: files, Resolver: r, Now: now})
	want := []dataplane.Egress{
		{Prefix: pr("192.0.2.10"), Ports: []dataplane.PortRule{ports(443, 443, dataplane.ProtoTCP)}},
		{Prefix: pr("2001:db8::10"), Ports: []dataplane.PortRule{ports(443, 443, dataplane.ProtoTCP)}},
	}
	if !reflect.DeepEqual(res.RuleSet.Egress, want) {
		t.Errorf("egress %v", res.RuleSet.Egress)
	}
	if len(res.Refused) != 1 || !strings.Contains(res.Refused[0].Error(), `egress[1]: fqdn "gone.example.com": no such name`) {
		t.Errorf("refused %v", res.Refused)
	}
	// The failed name is tried again soon; the resolved one at its TTL.
	if !res.RefreshAt.Equal(now.Add(dnsFloor)) {
		t.Errorf("refresh at %v", res.RefreshAt)
	}
	// The resolved addresses hold in the kernel until a grace after their TTL (30 s), the failed
	// name's retry aside: with tetherd stopped, they end then.
	if want := now.Add(30*time.Second + dnsGrace); !res.RuleSet.Expires.Equal(want) {
		t.Errorf("rule set expires %v, want %v", res.RuleSet.Expires, want)
	}
	// Nothing resolved: nothing expires.
	res = Compile(context.Background(), grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8"}, {FQDN: "gone.example.com"}}},
		Options{Files: files, Resolver: r, Now: now})
	if !res.RuleSet.Expires.IsZero() {
		t.Errorf("no name resolved: the rule set expires %v, want never", res.RuleSet.Expires)
	}
}

func TestTooManyEntriesGrantsNothing(t *testing.T) {
	var g grants.Grants
	for i := range dataplane.MaxRules {
		g.Egress = append(g.Egress, grants.Egress{CIDR: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String()})
	}
	res := Compile(context.Background(), g, Options{Files: files})
	if res.RuleSet.Entries() != 1 || res.Err() == nil || !strings.Contains(res.Err().Error(), "nothing is granted") {
		t.Errorf("%d entries, %v", res.RuleSet.Entries(), res.Err())
	}
}

// FuzzCompile feeds arbitrary CIDRs, ports and paths through the compiler: it must return a rule
// set the kernel can take or an error, never panic.
func FuzzCompile(f *testing.F) {
	f.Add("10.0.0.0/8", "443", "tcp", "/run/x.sock")
	f.Add("::/0", "1-65535", "", "@abstract")
	f.Add("::ffff:1.2.3.4", "0", "udp", "/run/dir/*")
	f.Fuzz(func(t *testing.T, cidr, port, proto, unixPath string) {
		var pr []grants.PortRange
		if r, err := grants.ParsePortRange(port); err == nil {
			pr = append(pr, r)
		}
		res := Compile(context.Background(), grants.Grants{
			Egress: []grants.Egress{{CIDR: cidr, Ports: pr, Protocol: proto}, {CIDR: "0.0.0.0/0", Ports: pr}},
			Unix:   []grants.Unix{{Path: unixPath}},
		}, Options{Files: files})
		for _, e := range res.RuleSet.Egress {
			if !e.Prefix.Addr().Is6() || len(e.Ports) > dataplane.MaxPortRules {
				t.Fatalf("bad entry %v", e)
			}
		}
		for _, u := range res.RuleSet.Unix {
			if len(u.Path) == 0 || len(u.Path) > dataplane.MaxUnixPath {
				t.Fatalf("bad unix entry %q", u.Path)
			}
		}
	})
}

func TestMountDevicesOf(t *testing.T) {
	got := mountDevicesOf([]*procfs.MountInfo{{MountID: 22, MajorMinorVer: "254:0"}, {MountID: 41, MajorMinorVer: "0:38"}, {MountID: 7, MajorMinorVer: "bad"}})
	if got[22] != 0xfe00 || got[41] != 38 || len(got) != 2 {
		t.Errorf("got %v", got)
	}
}

// TestOSStat checks the kernel's view of a file: on the file systems of this host the superblock
// device from mountinfo is what stat reports too (they differ on btrfs).
func TestOSStat(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	fst, err := OS{}.Stat(self)
	id := fst.ID
	if err != nil || !fst.Regular || id.Ino == 0 || fst.Changed == 0 {
		t.Fatalf("%+v %v", fst, err)
	}
	var st syscall.Stat_t
	syscall.Stat(self, &st)
	if id.Ino != st.Ino {
		t.Errorf("inode %d, stat says %d", id.Ino, st.Ino)
	}
	var fs syscall.Statfs_t
	syscall.Statfs(self, &fs)
	const btrfsMagic = 0x9123683e
	if fs.Type != btrfsMagic && id.Dev != st.Dev {
		t.Errorf("device %#x, stat says %#x", id.Dev, st.Dev)
	}
	if _, err := (OS{}).Stat("/does/not/exist"); !os.IsNotExist(err) {
		t.Errorf("missing file: %v", err)
	}
}

func TestWritableWarnings(t *testing.T) {
	f := files
	f.writable = map[string]bool{"/opt/x": true}
	res := Compile(context.Background(), grants.Grants{Exec: []grants.Exec{{Path: "/opt/x/a"}}}, Options{Files: f})
	if len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "writable by every user") {
		t.Errorf("warnings %v", res.Warnings)
	}
}

// BenchmarkCompileEgress compiles n distinct prefixes (with one covering prefix): what a large
// agent rule set costs to recompile.
func BenchmarkCompileEgress(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		g := grants.Grants{Egress: []grants.Egress{{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 53, Hi: 53}}}}}
		for i := range n {
			g.Egress = append(g.Egress, grants.Egress{CIDR: netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}).String(), Protocol: "tcp", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}})
		}
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			for b.Loop() {
				if err := Compile(context.Background(), g, Options{Files: files}).Err(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestCountedGrants: a rule that holds by an approval carries its counted grant into the kernel
// rule, also where a covering prefix passes it on; it is joined only with rules of its own grant,
// dropped where an uncounted rule allows the same, and refused without a grant or as an audit
// rule.
func TestCountedGrants(t *testing.T) {
	tcp := func(lo, hi uint16, grant uint32) dataplane.PortRule {
		return dataplane.PortRule{Proto: dataplane.ProtoTCP, Lo: lo, Hi: hi, Grant: grant}
	}
	one := []grants.PortRange{{Lo: 443, Hi: 443}}
	res := Compile(context.Background(), grants.Grants{Egress: []grants.Egress{
		{CIDR: "10.0.0.0/8", Ports: one, Protocol: "tcp", Approval: "a1", Grant: 3},
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 444, Hi: 444}}, Protocol: "tcp", Approval: "a1", Grant: 3},
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 445, Hi: 445}}, Protocol: "tcp", Approval: "a2", Grant: 4},
		{CIDR: "10.1.0.0/16", Ports: []grants.PortRange{{Lo: 80, Hi: 80}}, Protocol: "tcp"},
		{CIDR: "192.0.2.1", Ports: one, Protocol: "tcp", Approval: "a3", Grant: 5},
		{CIDR: "192.0.2.1", Ports: one, Protocol: "tcp"},
		{CIDR: "192.0.2.2", Ports: one, Protocol: "tcp", Approval: "none"},
		{CIDR: "192.0.2.3", Ports: one, Protocol: "tcp", Approval: "a4", Grant: 6, Audit: true},
	}}, Options{Files: files})
	got := map[netip.Prefix][]dataplane.PortRule{}
	for _, e := range res.RuleSet.Egress {
		got[e.Prefix] = e.Ports
	}
	want := map[netip.Prefix][]dataplane.PortRule{
		pr("10.0.0.0/8"):   {tcp(443, 444, 3), tcp(445, 445, 4)},
		pr("10.1.0.0/16"):  {tcp(80, 80, 0), tcp(443, 444, 3), tcp(445, 445, 4)},
		pr("192.0.2.1/32"): {tcp(443, 443, 0)},
	}
	for p, w := range want {
		if !reflect.DeepEqual(got[p], w) {
			t.Errorf("%s: got %v\nwant %v", p, got[p], w)
		}
	}
	if len(res.Refused) != 2 || !strings.Contains(res.Refused[0].Reason, `approval "none"`) || !strings.Contains(res.Refused[1].Reason, `approval "a4"`) {
		t.Errorf("refused %v: want the rule without a grant and the audit rule", res.Refused)
	}
}

// TestMaxDuration: a rule's max_duration reaches its kernel rules, also where a covering prefix
// passes it on; a rule without one (or with a longer one) contains a rule with one, and comes
// first, so the loosest limit applies; rules of different limits are not joined; a duration that
// is not whole milliseconds between 1ms and the kernel's limit is refused.
func TestMaxDuration(t *testing.T) {
	tcp := func(lo, hi uint16, d time.Duration) dataplane.PortRule {
		return dataplane.PortRule{Proto: dataplane.ProtoTCP, Lo: lo, Hi: hi, MaxDuration: d}
	}
	one := []grants.PortRange{{Lo: 443, Hi: 443}}
	res := Compile(context.Background(), grants.Grants{Egress: []grants.Egress{
		{CIDR: "10.0.0.0/8", Ports: one, Protocol: "tcp", MaxDuration: "30m"},
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 444, Hi: 444}}, Protocol: "tcp", MaxDuration: "30m"},
		{CIDR: "10.0.0.0/8", Ports: []grants.PortRange{{Lo: 400, Hi: 500}}, Protocol: "tcp", MaxDuration: "5s"},
		{CIDR: "10.1.0.0/16", Ports: []grants.PortRange{{Lo: 80, Hi: 80}}, Protocol: "tcp"},
		{CIDR: "192.0.2.1", Ports: one, Protocol: "tcp", MaxDuration: "1m"},
		{CIDR: "192.0.2.1", Ports: one, Protocol: "tcp"},
		{CIDR: "192.0.2.2", Ports: one, Protocol: "tcp", MaxDuration: "1m"},
		{CIDR: "192.0.2.2", Ports: one, Protocol: "tcp", MaxDuration: "2m"},
		{CIDR: "192.0.2.3", Ports: one, MaxDuration: "soon"},
		{CIDR: "192.0.2.4", Ports: one, MaxDuration: "0s"},
		{CIDR: "192.0.2.5", Ports: one, MaxDuration: "1500us"},
		{CIDR: "192.0.2.6", Ports: one, MaxDuration: "2000h"},
	}}, Options{Files: files})
	got := map[netip.Prefix][]dataplane.PortRule{}
	for _, e := range res.RuleSet.Egress {
		got[e.Prefix] = e.Ports
	}
	want := map[netip.Prefix][]dataplane.PortRule{
		pr("10.0.0.0/8"):   {tcp(443, 444, 30*time.Minute), tcp(400, 500, 5*time.Second)},
		pr("10.1.0.0/16"):  {tcp(80, 80, 0), tcp(443, 444, 30*time.Minute), tcp(400, 500, 5*time.Second)},
		pr("192.0.2.1/32"): {tcp(443, 443, 0)},
		pr("192.0.2.2/32"): {tcp(443, 443, 2*time.Minute)},
	}
	for p, w := range want {
		if !reflect.DeepEqual(got[p], w) {
			t.Errorf("%s: got %v\nwant %v", p, got[p], w)
		}
	}
	if len(res.Refused) != 4 {
		t.Fatalf("refused %v: want the four bad durations", res.Refused)
	}
	for _, f := range res.Refused {
		if !strings.Contains(f.Reason, "max_duration") {
			t.Errorf("refused %v, want a max_duration reason", f)
		}
	}
}

// TestSensitiveSockets: no grant reaches a socket in UnixNever, exactly or through a /dir/* rule;
// every agent gets the sockets in UnixAlways.
func TestSensitiveSockets(t *testing.T) {
	res := Compile(context.Background(), grants.Grants{Unix: []grants.Unix{
		{Path: "/run/tether/*"}, {Path: "/run/tether/tether.sock"}, {Path: "/var/run/docker.sock"}, {Path: "/run/app.sock"},
		{Path: "/run/docker.sock"}, {Path: "/var/run/tether/*"}, {Path: "/var/run/containerd/containerd.sock"},
	}}, Options{Files: files, UnixAlways: []string{"/run/tether/agent.sock"},
		UnixNever: []string{"/run/tether/tether.sock", "/var/run/docker.sock", "/run/containerd/containerd.sock"}})
	var got []string
	for _, u := range res.RuleSet.Unix {
		got = append(got, u.Path)
	}
	if want := []string{"/run/app.sock", "/run/tether/agent.sock"}; !reflect.DeepEqual(got, want) {
		t.Errorf("unix rules %v, want %v", got, want)
	}
	// Compared as what they reach: /var/run is /run (a symbolic link), either way round.
	if len(res.Refused) != 6 {
		t.Errorf("refused %v: want the six rules that reach a sensitive socket", res.Refused)
	}
}

// TestIntegrity grants real files: at their change time; a file modified in place only while its
// content is the one first granted, or the one its rule's sha256 names; a rule whose sha256 does
// not match is refused.
func TestIntegrity(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tool")
	write := func(content string) {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(content)
		f.Close()
	}
	write("one")
	in := NewIntegrity()
	compileExec := func(e grants.Exec) *Result {
		return Compile(context.Background(), grants.Grants{Exec: []grants.Exec{e}}, Options{Files: OS{}, Integrity: in})
	}
	st, _ := OS{}.Stat(path)
	res := compileExec(grants.Exec{Path: path})
	if len(res.RuleSet.Exec) != 1 || res.RuleSet.Exec[0].Changed != st.Changed || res.Err() != nil {
		t.Fatalf("first grant: %+v %v, want the file at change time %d", res.RuleSet.Exec, res.Err(), st.Changed)
	}
	in.Settle() // its first digest is taken in the background
	// Rewritten in place with other content: refused, and says why.
	time.Sleep(10 * time.Millisecond)
	write("two")
	res = compileExec(grants.Exec{Path: path})
	if len(res.RuleSet.Exec) != 0 || !strings.Contains(fmt.Sprint(res.Err()), "modified in place") {
		t.Errorf("modified file: %+v %v, want it refused", res.RuleSet.Exec, res.Err())
	}
	// Its new digest named in the rule grants it, at its new change time.
	two := sha256.Sum256([]byte("two"))
	res = compileExec(grants.Exec{Path: path, SHA256: hex.EncodeToString(two[:])})
	st2, _ := OS{}.Stat(path)
	if len(res.RuleSet.Exec) != 1 || res.RuleSet.Exec[0].Changed != st2.Changed || st2.Changed == st.Changed {
		t.Errorf("modified file with its digest: %+v %v", res.RuleSet.Exec, res.Err())
	}
	// Back to the first content (a touch, a chmod): granted again without a digest.
	write("one")
	if res = compileExec(grants.Exec{Path: path}); len(res.RuleSet.Exec) != 1 {
		t.Errorf("file back to its granted content: %v", res.Err())
	}
	// A file that changes before its first digest is taken has no content to be granted with.
	fresh := filepath.Join(dir, "fresh")
	os.WriteFile(fresh, []byte("fresh"), 0o755)
	fst, _ := OS{}.Stat(fresh)
	pending := NewIntegrity()
	pending.files[fst.ID] = integrityRecord{changed: fst.Changed, pending: true} // as if not hashed yet
	time.Sleep(10 * time.Millisecond)
	os.WriteFile(fresh, []byte("changed"), 0o755)
	if res := Compile(context.Background(), grants.Grants{Exec: []grants.Exec{{Path: fresh}}}, Options{Files: OS{}, Integrity: pending}); len(res.RuleSet.Exec) != 0 ||
		!strings.Contains(fmt.Sprint(res.Err()), "before its content could be recorded") {
		t.Errorf("changed before its digest was taken: %+v %v", res.RuleSet.Exec, res.Err())
	}
	// A digest that does not match, a malformed one, and a rule with neither path nor digest are
	// refused.
	for _, e := range []grants.Exec{{Path: path, SHA256: hex.EncodeToString(two[:])}, {Path: path, SHA256: "abc"}, {}} {
		if res := compileExec(e); len(res.RuleSet.Exec) != 0 || len(res.Refused) != 1 {
			t.Errorf("%+v: %+v, refused %v", e, res.RuleSet.Exec, res.Refused)
		}
	}
}

// TestExecByContent: a rule by sha256 alone grants the files learnt to have that content (a file
// an agent tried to execute), at the change time they had it, and nothing before.
func TestExecByContent(t *testing.T) {
	dir := t.TempDir()
	tool, other := filepath.Join(dir, "tool"), filepath.Join(dir, "other")
	os.WriteFile(tool, []byte("content"), 0o755)
	os.WriteFile(other, []byte("something else"), 0o755)
	sum := sha256.Sum256([]byte("content"))
	in := NewIntegrity()
	g := grants.Grants{Exec: []grants.Exec{{SHA256: hex.EncodeToString(sum[:])}}}
	compileIt := func() *Result { return Compile(context.Background(), g, Options{Files: OS{}, Integrity: in}) }
	if res := compileIt(); len(res.RuleSet.Exec) != 0 || res.Err() != nil || !in.Wants() {
		t.Fatalf("before any file is learnt: %+v %v", res.RuleSet.Exec, res.Err())
	}
	st, _ := OS{}.Stat(tool)
	ost, _ := OS{}.Stat(other)
	if ok, err := in.Learn(OS{}, other, ost.ID); ok || err != nil {
		t.Errorf("learning a file of other content: %v %v", ok, err)
	}
	if _, err := in.Learn(OS{}, tool, ost.ID); err == nil {
		t.Error("learning a path that is not the file the kernel saw: no error")
	}
	if ok, err := in.Learn(OS{}, tool, st.ID); !ok || err != nil {
		t.Fatalf("learning the file: %v %v", ok, err)
	}
	want := []dataplane.ExecRule{{File: st.ID, Changed: st.Changed}}
	if res := compileIt(); !reflect.DeepEqual(res.RuleSet.Exec, want) {
		t.Errorf("after learning: %+v, want %+v", res.RuleSet.Exec, want)
	}
}

func TestCompileListen(t *testing.T) {
	res := Compile(context.Background(), grants.Grants{Listen: []grants.Listen{
		{Ports: []grants.PortRange{{Lo: 8080, Hi: 8080}, {Lo: 9000, Hi: 9100}}, Protocol: "tcp"},
		{Ports: []grants.PortRange{{Lo: 53, Hi: 53}}, Protocol: "udp", Audit: true},
		{Protocol: "tcp"},
		{Ports: []grants.PortRange{{Lo: 1, Hi: 1}}, Protocol: "sctp"},
	}}, Options{Files: files})
	want := []dataplane.PortRule{{Proto: dataplane.ProtoTCP, Lo: 8080, Hi: 8080}, {Proto: dataplane.ProtoTCP, Lo: 9000, Hi: 9100},
		{Proto: dataplane.ProtoUDP, Lo: 53, Hi: 53, Audit: true}}
	if !reflect.DeepEqual(res.RuleSet.Listen, want) {
		t.Errorf("listen %+v, want %+v", res.RuleSet.Listen, want)
	}
	if len(res.Refused) != 2 {
		t.Errorf("refused %v, want the rule without ports and the one with sctp", res.Refused)
	}
}

// TestOSResolve resolves the host's own /var/run, a symbolic link to /run on most hosts.
func TestOSResolve(t *testing.T) {
	want := "/var/run/x.sock"
	if real, err := filepath.EvalSymlinks("/var/run"); err == nil {
		want = filepath.Join(real, "x.sock")
	}
	if got := (OS{}).Resolve("/var/run/x.sock"); got != want {
		t.Errorf("Resolve(/var/run/x.sock) = %s, want %s", got, want)
	}
	if got := (OS{}).Resolve("/no/such/dir/x.sock"); got != "/no/such/dir/x.sock" {
		t.Errorf("a path that does not exist: %s", got)
	}
}

// TestUnixDirs: each granted socket path also compiles to where it leads, its directory by
// identity (symbolic links resolved) and its name; a directory prefix to the directory alone.
func TestUnixDirs(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "sub")
	os.Mkdir(sub, 0o755)
	os.Symlink(dir, filepath.Join(dir, "link"))
	res := Compile(context.Background(), grants.Grants{Unix: []grants.Unix{
		{Path: filepath.Join(dir, "a.sock")}, {Path: filepath.Join(dir, "link", "a.sock")}, {Path: sub + "/*", Audit: true},
		{Path: "@bus"}, {Path: filepath.Join(dir, "missing", "b.sock")},
	}}, Options{Files: OS{}})
	d, _ := OS{}.Stat(dir)
	s, _ := OS{}.Stat(sub)
	want := []dataplane.UnixDir{{Dir: d.ID, Name: "a.sock"}, {Dir: s.ID, Audit: true}}
	slices.SortFunc(want, func(a, b dataplane.UnixDir) int { return cmp.Compare(a.Dir.Ino, b.Dir.Ino) })
	if !reflect.DeepEqual(res.RuleSet.UnixDirs, want) {
		t.Errorf("unix dirs %+v, want %+v", res.RuleSet.UnixDirs, want)
	}
}
