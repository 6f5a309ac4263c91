package kernel

import (
	"testing"
)

// TestPrivilegedLoad checks what the probe decided: every required hook runs, and the exec mode
// agrees with whether BPF LSM is usable here.
func TestPrivilegedLoad(t *testing.T) {
	f := newFixture(t, Options{})
	feat := f.k.Features()
	t.Logf("exec mode %s: %s", feat.ExecMode, feat.ExecReason)
	for _, h := range feat.Hooks {
		required := h.Name != "connect_unix" && h.Name != "sendmsg_unix" && h.Name != "exec_lsm"
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
}
