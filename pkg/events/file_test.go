package events

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestFileRotates: records go to path until the next one would pass MaxBytes; then the files move
// along (at most Keep old ones), and every record is whole in exactly one file.
func TestFileRotates(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "decisions.jsonl")
	l, err := OpenFile(path, 600, 2)
	if err != nil {
		t.Fatal(err)
	}
	const n = 40
	for i := range n {
		if err := l.Write(Decision{DecisionID: fmt.Sprintf("d%02d", i), Kind: "connect4", Verdict: "deny"}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	seen := map[string]bool{}
	for _, p := range []string{path, path + ".1", path + ".2"} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		st, _ := f.Stat()
		if st.Size() > 600 {
			t.Errorf("%s is %d bytes, over the limit", p, st.Size())
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var d Decision
			if err := json.Unmarshal(sc.Bytes(), &d); err != nil {
				t.Fatalf("%s: a torn record: %q", p, sc.Text())
			}
			seen[d.DecisionID] = true
		}
		f.Close()
	}
	if _, err := os.Stat(path + ".3"); !os.IsNotExist(err) {
		t.Errorf("more than 2 old files kept")
	}
	if !seen[fmt.Sprintf("d%02d", n-1)] || seen["d00"] {
		t.Errorf("want the newest records kept and the oldest rotated away: %v", seen)
	}
}

// TestFileBuffersUntilFlush: records wait in the buffer until Flush, then are in the file whole.
func TestFileBuffersUntilFlush(t *testing.T) {
	path := filepath.Join(t.TempDir(), "decisions.jsonl")
	l, err := OpenFile(path, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l.Write(Decision{DecisionID: "a"})
	if b, _ := os.ReadFile(path); len(b) != 0 {
		t.Fatalf("written before Flush: %q", b)
	}
	l.Flush()
	if b, _ := os.ReadFile(path); !strings.HasPrefix(string(b), `{"decision_id":"a"`) || !strings.HasSuffix(string(b), "}\n") {
		t.Fatalf("after Flush: %q", b)
	}
}

// TestPumpCountsRecordsOfAFailedFlush: when the buffered write fails, every record it held is
// counted lost, not one.
func TestPumpCountsRecordsOfAFailedFlush(t *testing.T) {
	l, err := OpenFile(filepath.Join(t.TempDir(), "decisions.jsonl"), 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	l.f.Close() // every write fails from now on
	src := &sliceSource{events: []dataplane.Event{{Slot: 1}, {Slot: 1}, {Slot: 1}}}
	p := NewPump(src, attr{}, 10, slog.New(slog.DiscardHandler), l)
	p.Run(errClosed)
	if st := p.Stats(); st.Written != 3 || st.SinkErrors != 3 {
		t.Errorf("stats %+v: want 3 written to the sinks and 3 lost by the file", st)
	}
}

// TestEmitIsWrittenAtOnce: a record tetherd emits itself (a kill) is in the file when Emit
// returns, not held in the buffer until the next kernel event.
func TestEmitIsWrittenAtOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "decisions.jsonl")
	l, err := OpenFile(path, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	p := NewPump(&sliceSource{}, attr{}, 10, slog.New(slog.DiscardHandler), l)
	p.Emit(Decision{Kind: "kill"})
	if b, _ := os.ReadFile(path); !strings.Contains(string(b), `"kind":"kill"`) {
		t.Fatalf("after Emit the file holds %q", b)
	}
}

// TestPrivilegedFileDiskFull: on a file system that fills up (a 64 KiB tmpfs), every record is
// either a whole line of the log or counted lost by a FlushError, never half written; once space
// returns, records are written again, each on its own line.
func TestPrivilegedFileDiskFull(t *testing.T) {
	privtest.Gate(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	filler := filepath.Join(dir, "filler")
	if err := os.WriteFile(filler, make([]byte, 40<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "decisions.jsonl")
	l, err := OpenFile(path, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	total, lost := 0, 0
	write := func(n int) (failed bool) {
		for range n {
			// Flushed every 7 records: blocks that do not end where the space does.
			err := l.Write(Decision{DecisionID: fmt.Sprintf("d%05d", total), Kind: "connect4", Verdict: "deny", Reason: Reason(strings.Repeat("x", 100))})
			total++
			if total%7 == 0 && err == nil {
				err = l.Flush()
			}
			var fe *FlushError
			if errors.As(err, &fe) {
				lost += fe.Records
				failed = true
			} else if err != nil {
				t.Fatal(err)
			}
		}
		return failed
	}
	if !write(400) {
		t.Fatal("400 records fit in 24 KiB: the test does not fill the disk")
	}
	os.Remove(filler)
	if write(70) {
		t.Fatal("a write failed after space returned")
	}
	if err := l.Flush(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	for i, line := range lines {
		var d Decision
		if err := json.Unmarshal([]byte(line), &d); err != nil {
			t.Fatalf("line %d is not a whole record: %q", i+1, line)
		}
	}
	if len(lines)+lost != total {
		t.Errorf("%d records: %d in the log, %d counted lost (%d unaccounted)", total, len(lines), lost, total-len(lines)-lost)
	}
	t.Logf("%d records: %d in the log, %d counted lost", total, len(lines), lost)
}

// Every record names the node whose tetherd wrote it, unless it names one already.
func TestRecordsNameTheNode(t *testing.T) {
	var buf bytes.Buffer
	p := NewPump(&sliceSource{}, attr{}, 10, slog.New(slog.DiscardHandler), NewJSONLines(&buf))
	p.Node = "node-7"
	p.Emit(Decision{Kind: "kill"})
	p.Emit(Decision{Kind: "identity", Node: "elsewhere"})
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], `"node":"node-7"`) || !strings.Contains(lines[1], `"node":"elsewhere"`) {
		t.Fatalf("records:\n%s", buf.String())
	}
}
