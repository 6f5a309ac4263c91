// Package deploy checks the deployment files: the systemd unit as make install places it.
package deploy

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
)

// verify runs systemd-analyze verify on a unit file: an error, or any warning, fails it.
func verify(unit string) error {
	cmd := exec.Command("systemd-analyze", "verify", "--man=no", unit)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil || out.Len() > 0 {
		return fmt.Errorf("systemd-analyze verify %s: %v: %s", filepath.Base(unit), err, out.String())
	}
	return nil
}

// TestSystemdUnit: make install puts the binaries, the unit and the default configuration in
// place (an edited configuration is kept), and systemd-analyze accepts the unit as installed,
// without a warning.
func TestSystemdUnit(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		if os.Getenv(privtest.RequireEnv) == "1" {
			t.Fatalf("needs systemd-analyze (Debian package systemd): %v (%s=1 forbids skipping)", err, privtest.RequireEnv)
		}
		t.Skipf("needs systemd-analyze (Debian package systemd): %v", err)
	}
	dest := t.TempDir()
	install := func() {
		cmd := exec.Command("make", "-C", "../..", "install", "DESTDIR="+dest, "PREFIX=/opt/tether")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make install: %v\n%s", err, out)
		}
	}
	install()
	for _, f := range []string{"opt/tether/bin/tetherd", "opt/tether/bin/tetherctl"} {
		if fi, err := os.Stat(filepath.Join(dest, f)); err != nil || fi.Mode().Perm()&0o111 == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
	conf := filepath.Join(dest, "etc/tether/tetherd.yaml")
	want, _ := os.ReadFile("../../deploy/systemd/tetherd.yaml")
	if got, err := os.ReadFile(conf); err != nil || !bytes.Equal(got, want) || len(want) == 0 {
		t.Errorf("installed configuration: %v, %d bytes, want the %d of deploy/systemd/tetherd.yaml", err, len(got), len(want))
	}
	// Production settings, not the demonstration's, and valid as tetherd checks it offline.
	if !bytes.Contains(want, []byte("allow_sample: 100")) || !bytes.Contains(want, []byte("metrics_address: 127.0.0.1:")) {
		t.Errorf("the installed configuration is not the production one:\n%s", want)
	}
	if out, err := exec.Command(filepath.Join(dest, "opt/tether/bin/tetherd"), "check-config", conf).CombinedOutput(); err != nil || !strings.Contains(string(out), conf+": valid") {
		t.Errorf("tetherd check-config %s: %v\n%s", conf, err, out)
	}
	os.WriteFile(conf, []byte("# edited\n"), 0o644)
	install()
	if got, _ := os.ReadFile(conf); string(got) != "# edited\n" {
		t.Error("make install overwrote an edited configuration")
	}

	unit := filepath.Join(dest, "etc/systemd/system/tetherd.service")
	b, err := os.ReadFile(unit)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "ExecStart=/opt/tether/bin/tetherd run --config /etc/tether/tetherd.yaml") || !strings.Contains(string(b), "Type=notify") {
		t.Fatalf("the installed unit does not run the installed tetherd:\n%s", b)
	}
	// Verified in this host's context: the binary it names is the one installed under DESTDIR.
	check := filepath.Join(t.TempDir(), "tetherd.service")
	os.WriteFile(check, bytes.ReplaceAll(b, []byte("/opt/tether/bin/"), []byte(filepath.Join(dest, "opt/tether/bin")+"/")), 0o644)
	if err := verify(check); err != nil {
		t.Error(err)
	}
	// The check fails on what systemd would ignore with a warning.
	bad := filepath.Join(t.TempDir(), "bad.service")
	os.WriteFile(bad, bytes.Replace(b, []byte("[Service]\n"), []byte("[Service]\nRestartSecs=1\n"), 1), 0o644)
	if err := verify(bad); err == nil || !strings.Contains(err.Error(), "RestartSecs") {
		t.Errorf("a unit with an unknown key passed: %v", err)
	}

	// Hardened: systemd's own exposure score (0 safest, 10 most exposed) stays at or below 4.0.
	// Without the hardening block the same unit scores far worse, and the check says so.
	if out, err := exposure(check); err != nil {
		t.Errorf("the unit's exposure is above %d/100: %v\n%s", exposureLimit, err, out)
	} else {
		t.Logf("%s", lastLine(out))
	}
	var soft bytes.Buffer
	for _, l := range bytes.SplitAfter(b, []byte("\n")) {
		if !bytes.HasPrefix(l, []byte("Protect")) && !bytes.HasPrefix(l, []byte("Restrict")) && !bytes.HasPrefix(l, []byte("Private")) &&
			!bytes.HasPrefix(l, []byte("SystemCall")) && !bytes.HasPrefix(l, []byte("CapabilityBoundingSet")) {
			soft.Write(l)
		}
	}
	unhardened := filepath.Join(t.TempDir(), "tetherd.service")
	os.WriteFile(unhardened, bytes.ReplaceAll(soft.Bytes(), []byte("/opt/tether/bin/"), []byte(filepath.Join(dest, "opt/tether/bin")+"/")), 0o644)
	if out, err := exposure(unhardened); err == nil {
		t.Errorf("the unit without its hardening passes the exposure check:\n%s", lastLine(out))
	}
}

// exposureLimit is the highest exposure (x10) the unit may have in systemd-analyze security.
const exposureLimit = 40

// exposure runs systemd-analyze security offline on unit, failing above exposureLimit.
func exposure(unit string) (string, error) {
	out, err := exec.Command("systemd-analyze", "security", "--offline=true", fmt.Sprintf("--threshold=%d", exposureLimit), unit).CombinedOutput()
	return string(out), err
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
