// Package spiretest runs a real SPIRE server and agent for tether's end-to-end tests and
// benchmarks: sqlite datastore, join-token node attestation, the unix workload attestor with
// workload paths, and a delegate (tetherd's SPIFFE ID) allowed to use the agent's Delegated
// Identity API. Everything lives in a short temporary directory (unix socket paths are limited to
// 108 bytes). The binaries come from tools/spire (make spire).
package spiretest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// SPIRE is a running server and agent.
type SPIRE struct {
	Bin, Dir    string
	TrustDomain string
	ServerSock  string // server admin API
	PublicSock  string // agent Workload API
	AdminSock   string // agent admin API (Delegated Identity)

	procs []*exec.Cmd
	logs  []*logBuffer
	// agentConf is the agent's configuration with %s for its join token.
	agentConf string
}

type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// Binaries is where spire-server and spire-agent are: TETHER_SPIRE_BIN, else .bin in the
// repository root (found from dir upwards); an error says how to build them.
func Binaries(dir string) (string, error) {
	bin := os.Getenv("TETHER_SPIRE_BIN")
	if bin == "" {
		for d, _ := filepath.Abs(dir); ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
				bin = filepath.Join(d, ".bin")
				break
			}
			if d == filepath.Dir(d) {
				return "", errors.New("no go.mod above " + dir + ": set TETHER_SPIRE_BIN")
			}
		}
	}
	for _, b := range []string{"spire-server", "spire-agent"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return "", fmt.Errorf("needs the SPIRE binaries (make spire): %w", err)
		}
	}
	return bin, nil
}

// Start starts a server and an agent for trust domain td whose agent lets delegate use the
// Delegated Identity API, and waits until both are healthy. Close stops them.
func Start(bin, td, delegate string) (_ *SPIRE, err error) {
	dir, err := os.MkdirTemp("", "tsp")
	if err != nil {
		return nil, err
	}
	s := &SPIRE{Bin: bin, Dir: dir, TrustDomain: td,
		ServerSock: filepath.Join(dir, "server", "api.sock"), PublicSock: filepath.Join(dir, "public", "api.sock"), AdminSock: filepath.Join(dir, "admin", "admin.sock")}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	for _, sub := range []string{"server", "agent", "public", "admin"} {
		if err := os.Mkdir(filepath.Join(dir, sub), 0o750); err != nil {
			return nil, err
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	server := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "WARN"
  default_x509_svid_ttl = "1h"
  experimental { cache_reload_interval = "1s" }
}
plugins {
  DataStore "sql" { plugin_data { database_type = "sqlite3" connection_string = %q } }
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "disk" { plugin_data { keys_path = %q } }
}
`, port, s.ServerSock, td, filepath.Join(dir, "server"), filepath.Join(dir, "server", "datastore.sqlite3"), filepath.Join(dir, "server", "keys.json"))
	if err := s.start("spire-server", "server.conf", server); err != nil {
		return nil, err
	}
	if err := s.waitHealthy("spire-server", "-socketPath", s.ServerSock); err != nil {
		return nil, err
	}
	s.agentConf = fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = %q
  admin_socket_path = %q
  trust_domain = %q
  insecure_bootstrap = true
  join_token = "%%s"
  authorized_delegates = [%q]
  experimental { sync_interval = "1s" }
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
  WorkloadAttestor "unix" { plugin_data { discover_workload_path = true } }
}
`, filepath.Join(dir, "agent"), port, s.PublicSock, s.AdminSock, td, delegate)
	if err := s.startAgent(); err != nil {
		return nil, err
	}
	return s, nil
}

// startAgent starts the agent with a new join token (a token attests once) and a clean data
// directory, and waits until it is healthy.
func (s *SPIRE) startAgent() error {
	out, err := s.Server("token", "generate", "-spiffeID", "spiffe://"+s.TrustDomain+"/node", "-ttl", "600")
	if err != nil {
		return err
	}
	token := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out), "Token:"))
	if token == "" || strings.ContainsAny(token, " \n\"") {
		return fmt.Errorf("join token from %q", out)
	}
	data := filepath.Join(s.Dir, "agent")
	os.RemoveAll(data)
	if err := os.Mkdir(data, 0o750); err != nil {
		return err
	}
	if err := s.start("spire-agent", "agent.conf", fmt.Sprintf(s.agentConf, token)); err != nil {
		return err
	}
	return s.waitHealthy("spire-agent", "-socketPath", s.PublicSock)
}

// Stop stops the server and the agent (SIGTERM), keeping their data: Restart starts them again.
func (s *SPIRE) Stop() {
	for _, cmd := range s.procs {
		if cmd.ProcessState == nil {
			stop(cmd)
		}
	}
}

// Restart starts the server again on its data (its entries are kept), then the agent, which
// attests anew, and waits until both are healthy.
func (s *SPIRE) Restart() error {
	if err := s.start("spire-server", "server.conf", ""); err != nil {
		return err
	}
	if err := s.waitHealthy("spire-server", "-socketPath", s.ServerSock); err != nil {
		return err
	}
	return s.startAgent()
}

func stop(cmd *exec.Cmd) {
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// start runs bin with the configuration confName, written first unless conf is empty (a
// restart on the same one).
func (s *SPIRE) start(bin, confName, conf string) error {
	path := filepath.Join(s.Dir, confName)
	if conf != "" {
		if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
			return err
		}
	}
	cmd := exec.Command(filepath.Join(s.Bin, bin), "run", "-config", path)
	log := &logBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return err
	}
	s.procs, s.logs = append(s.procs, cmd), append(s.logs, log)
	return nil
}

func (s *SPIRE) waitHealthy(bin string, args ...string) error {
	deadline := time.Now().Add(30 * time.Second)
	var out []byte
	for time.Now().Before(deadline) {
		var err error
		out, err = exec.Command(filepath.Join(s.Bin, bin), append([]string{"healthcheck", "-shallow"}, args...)...).CombinedOutput()
		if err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s did not become healthy: %s\n%s", bin, out, s.Logs())
}

// Logs is what the server and agent printed.
func (s *SPIRE) Logs() string {
	var b strings.Builder
	for i, l := range s.logs {
		l.mu.Lock()
		fmt.Fprintf(&b, "%s log:\n%s\n", filepath.Base(s.procs[i].Path), l.b.String())
		l.mu.Unlock()
	}
	return b.String()
}

// Close stops the server and the agent and removes their directory.
func (s *SPIRE) Close() {
	s.Stop()
	os.RemoveAll(s.Dir)
}

// Server runs a spire-server command against the server and returns its output.
func (s *SPIRE) Server(args ...string) (string, error) {
	full := append(append([]string{}, args...), "-socketPath", s.ServerSock)
	cmd := exec.Command(filepath.Join(s.Bin, "spire-server"), full...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("spire-server %v: %v\n%s", args, err, out.String())
	}
	return out.String(), nil
}

var entryIDRe = regexp.MustCompile(`Entry ID\s*:\s*(\S+)`)

// Entry registers a workload entry below the node and returns its entry ID.
func (s *SPIRE) Entry(spiffeID string, selectors ...string) (string, error) {
	args := []string{"entry", "create", "-parentID", "spiffe://" + s.TrustDomain + "/node", "-spiffeID", spiffeID, "-x509SVIDTTL", "600"}
	for _, sel := range selectors {
		args = append(args, "-selector", sel)
	}
	out, err := s.Server(args...)
	if err != nil {
		return "", err
	}
	m := entryIDRe.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("no entry ID in the output of entry create: %s", out)
	}
	return m[1], nil
}
