package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/tether-sh/tether/pkg/cgroups"
)

// The launch part times `tetherctl run --id ID -- true` against the real tetherd, end to end
// (register, compile and install the rules, the confinement, COMMAND, unregister), for the three
// sandbox profiles, and the same `true` started directly as the baseline, interleaved so that
// each sample of every row sees the same machine.
const launchSamples = 50

var launchRows = []struct {
	name, id, sandbox string
}{
	{"sandbox off (not confined)", "spiffe://bench.tether/launch/off", "off"},
	{"sandbox default", "spiffe://bench.tether/launch/default", "default"},
	{"sandbox strict", "spiffe://bench.tether/launch/strict", "strict"},
}

type launchResults struct {
	baseline []time.Duration
	rows     [][]time.Duration // per launchRows
}

func measureLaunch(e *env) (*launchResults, error) {
	bin := filepath.Join(filepath.Dir(e.self), "tetherd")
	ctl := filepath.Join(filepath.Dir(e.self), "tetherctl")
	for _, b := range []string{bin, ctl} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("the launch part runs tetherd and tetherctl, built next to the bench binary (make bench builds them): %w", err)
		}
	}
	parent := filepath.Join(e.base, "launch")
	if _, err := cgroups.Create(parent); err != nil {
		return nil, err
	}
	more := tetherdSetup{profiles: map[string]any{}, identities: map[string]any{}, config: "launch:\n  - ids: [spiffe://bench.tether/launch/*]\n    uids: [0]\n    unconfined: true\n"}
	for _, r := range launchRows {
		more.profiles[r.sandbox] = map[string]any{"exec": []string{e.trueBin}, "egress": []any{}, "unix": []any{}, "high_risk": []string{}, "sandbox": r.sandbox}
		more.identities[r.id] = map[string]any{"task_type": r.sandbox}
	}
	t, err := startTetherd(e, bin, parent, more)
	if err != nil {
		return nil, err
	}
	defer t.stop()
	socket := filepath.Join(t.dir, "t.sock")
	res := &launchResults{rows: make([][]time.Duration, len(launchRows))}
	timed := func(argv ...string) (time.Duration, error) {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stdout = io.Discard
		out := &limitedBuffer{}
		cmd.Stderr = out
		start := time.Now()
		err := cmd.Run()
		d := time.Since(start)
		if err != nil {
			return 0, fmt.Errorf("%v: %w: %s", argv, err, out.b)
		}
		return d, nil
	}
	fmt.Fprintf(os.Stderr, "launch: tetherctl run -- true, %d samples of each profile and of true alone\n", launchSamples)
	for range launchSamples {
		d, err := timed(e.trueBin)
		if err != nil {
			return nil, err
		}
		res.baseline = append(res.baseline, d)
		for i, r := range launchRows {
			d, err := timed(ctl, "--socket", socket, "run", "--id", r.id, "--", e.trueBin)
			if err != nil {
				return nil, err
			}
			res.rows[i] = append(res.rows[i], d)
		}
	}
	return res, nil
}

// limitedBuffer keeps the first 4 KiB written to it.
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := 4096 - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func durationQuantile(d []time.Duration, q float64) time.Duration {
	s := make([]float64, len(d))
	for i, v := range d {
		s[i] = float64(v)
	}
	slices.Sort(s)
	return time.Duration(quantile(s, q))
}

func reportLaunch(w io.Writer, r *launchResults) {
	fmt.Fprintf(w, "\nLAUNCH: tetherctl run --id ID -- true, wall clock from exec of tetherctl to its exit, %d samples each, interleaved\n", len(r.baseline))
	fmt.Fprintf(w, "  %-28s %10s %10s %10s\n", "", "median", "p90", "min")
	row := func(name string, d []time.Duration) {
		fmt.Fprintf(w, "  %-28s %10s %10s %10s\n", name, durationQuantile(d, 0.5).Round(10*time.Microsecond),
			durationQuantile(d, 0.9).Round(10*time.Microsecond), slices.Min(d).Round(10*time.Microsecond))
	}
	row("true alone (baseline)", r.baseline)
	for i, l := range launchRows {
		row(l.name, r.rows[i])
	}
	off, def := durationQuantile(r.rows[0], 0.5), durationQuantile(r.rows[1], 0.5)
	fmt.Fprintf(w, "  confinement (default against off): %+v median (%+.1f%%)\n", (def - off).Round(10*time.Microsecond), 100*float64(def-off)/float64(off))
}
