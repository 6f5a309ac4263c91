package e2e

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestPrivilegedSystemdNotify: run as a Type=notify unit ($NOTIFY_SOCKET), tetherd says READY=1
// only once its programs are attached and pinned (the connect4 link pin is there when the message
// arrives) and its API serves, and STOPPING=1 when it stops. Without the socket it says nothing
// (every other test runs it so).
func TestPrivilegedSystemdNotify(t *testing.T) {
	d := newTetherd(t, profile{})
	sock := filepath.Join(d.dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	type message struct {
		text   string
		pinned bool // the connect4 link pin existed when it arrived
	}
	got := make(chan message, 8)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(got)
				return
			}
			pins, _ := filepath.Glob(filepath.Join(d.pin, "links", "cg-*-connect4"))
			got <- message{string(buf[:n]), len(pins) == 1}
		}
	}()
	d.env = append(d.env, "NOTIFY_SOCKET="+sock)
	d.start()
	wait := func(want string) message {
		t.Helper()
		select {
		case m, ok := <-got:
			if !ok || !strings.Contains(m.text, want) {
				t.Fatalf("systemd was told %q, want %s", m.text, want)
			}
			return m
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s from tetherd within 10 s", want)
		}
		return message{}
	}
	if m := wait("READY=1"); !m.pinned {
		t.Errorf("READY=1 before the connect4 link was pinned (%q)", m.text)
	}
	if _, _, code := d.ctlRaw("status"); code != 0 {
		t.Errorf("tetherctl status after READY=1: exit %d", code)
	}
	d.stop()
	wait("STOPPING=1")
}
