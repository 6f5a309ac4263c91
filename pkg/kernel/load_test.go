package kernel

import (
	"os"
	"strings"
	"testing"
)

// TestPrivilegedLoad checks what the probe decided: every required hook runs, and the exec mode
// agrees with whether BPF LSM is usable here.
func TestPrivilegedLoad(t *testing.T) {
	f := newFixture(t, Options{})
	feat := f.k.Features()
	t.Logf("exec mode %s: %s", feat.ExecMode, feat.ExecReason)
	for name, p := range f.k.coll.Programs {
		if info, err := p.Info(); err == nil {
			if n, ok := info.VerifiedInstructions(); ok {
				t.Logf("%s: %d instructions verified", name, n)
			}
		}
	}
	for _, h := range feat.Hooks {
		required := !strings.Contains(h.Name, "unix") && h.Name != "exec_lsm" && !(strings.HasPrefix(h.Name, "sweep_") && noSockDestroyExpected())
		if spec := hookSpecOf(h.Name); spec.guard {
			// The LSM guards run wherever BPF LSM does, and say why not elsewhere.
			required = feat.LSMUsable
			if !h.Active && h.Reason == "" {
				t.Errorf("guard %s is off without a reason", h.Name)
			}
		}
		if required && !h.Active {
			t.Errorf("required hook %s is not active: %s", h.Name, h.Reason)
		}
	}
	want := ExecSignal
	if feat.LSMUsable {
		want = ExecLSM
	}
	if feat.ExecMode != want {
		t.Errorf("exec mode %s with LSM usable=%v", feat.ExecMode, feat.LSMUsable)
	}
	if lsm := feat.hook("exec_lsm"); lsm.Active != (want == ExecLSM) {
		t.Errorf("exec_lsm active=%v in mode %s", lsm.Active, feat.ExecMode)
	}
	// Unix rules are enforced by one of the two ways, or the status says they are not.
	for _, k := range []string{"connect_unix", "sendmsg_unix"} {
		cg, lsm := feat.hook(k), feat.hook(k+"_lsm")
		if cg.Active == lsm.Active && (cg.Active || feat.LSMUsable) {
			t.Errorf("%s active=%v, %s_lsm active=%v with LSM usable=%v", k, cg.Active, k, lsm.Active, feat.LSMUsable)
		}
	}
	// The test guest of make test-vm knows which mode its kernel command line allows.
	if expect := os.Getenv("TETHER_EXPECT_EXEC_MODE"); expect != "" && string(feat.ExecMode) != expect {
		t.Errorf("exec mode %s, the environment expects %s (active LSMs %q): %s", feat.ExecMode, expect, feat.ActiveLSMs, feat.ExecReason)
	}
}

func hookSpecOf(name string) hookSpec {
	for _, h := range hookSpecs {
		if h.name == name {
			return h
		}
	}
	return hookSpec{}
}
