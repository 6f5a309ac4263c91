package events

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a writer and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestFollowAcrossRotations: Follow copies every record of a decision log that rotates at every
// record while it is read (the file sink's rotation, 300-byte files: several rotations between
// two of Follow's looks), each once and in order; it waits for a log that does not exist yet.
func TestFollowAcrossRotations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "decisions.jsonl")
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Follow(ctx, path, true, &out, 2*time.Millisecond) }()
	time.Sleep(20 * time.Millisecond) // the log does not exist yet
	l, err := OpenFile(path, 300, 20)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond) // Follow finds it (a follower that starts after a rotation misses what was rotated)
	const n = 60
	for i := range n {
		if err := l.Write(Decision{DecisionID: fmt.Sprintf("d%03d", i), Kind: "connect4"}); err != nil {
			t.Fatal(err)
		}
		l.Flush()
		if i%10 != 0 {
			time.Sleep(time.Millisecond) // and now and then several at once
		}
	}
	l.Close()
	deadline := time.Now().Add(5 * time.Second)
	for strings.Count(out.String(), "\n") < n && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != n {
		t.Fatalf("%d records followed, want %d:\n%s", len(lines), n, out.String())
	}
	for i, line := range lines {
		var d Decision
		if err := json.Unmarshal([]byte(line), &d); err != nil || d.DecisionID != fmt.Sprintf("d%03d", i) {
			t.Fatalf("record %d: %q (%v)", i, line, err)
		}
	}
}
