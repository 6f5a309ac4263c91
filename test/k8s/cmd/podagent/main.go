// Command podagent is every program in make test-k8s's images: the pause container, the agent
// container's main process, the test hosts outside the cluster, and what the test runs inside
// the agent. Static, so an image is this file and nothing else.
//
//	podagent pause                 wait for SIGTERM, reaping children (a pod's sandbox)
//	podagent serve ADDR            answer "tether-k8s" on ADDR until SIGTERM, reaping children
//	podagent connect HOST:PORT     connect, print the answer; the error and exit 1 on failure
//	podagent run PATH [ARG...]     run PATH, print how it ended
//	podagent hello                 print "hello" (the agent image's allowed and denied copies)
//	podagent copy SRC DST          copy file SRC to a new executable file DST
//	podagent append PATH           append a byte to file PATH (it still runs)
//	podagent api SOCKET PATH       GET PATH from the HTTP server on the unix socket SOCKET
//	podagent dns RESOLVER NAME     look NAME up (A) at RESOLVER (host:port, UDP), print the addresses
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: podagent pause|serve ADDR|connect HOST:PORT|run PATH...|hello")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "pause":
		waitForTerm()
	case "serve":
		for _, addr := range os.Args[2:] {
			l, err := net.Listen("tcp", addr)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			go answer(addr, l)
		}
		fmt.Println("serving")
		waitForTerm()
	case "connect":
		c, err := net.DialTimeout("tcp", os.Args[2], 5*time.Second)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Print(string(b))
	case "run":
		cmd := exec.Command(os.Args[2], os.Args[3:]...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		err := cmd.Run()
		fmt.Printf("ended: %v\n", cmd.ProcessState)
		if err != nil {
			os.Exit(1)
		}
	case "hello":
		fmt.Println("hello")
	case "append":
		exitOn(appendByte(os.Args[2]))
	case "copy":
		b, err := os.ReadFile(os.Args[2])
		if err == nil {
			err = os.WriteFile(os.Args[3], b, 0o755)
		}
		exitOn(err)
	case "api":
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", os.Args[2])
			}}}
		resp, err := hc.Get("http://tether" + os.Args[3])
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		b, _ := io.ReadAll(resp.Body)
		fmt.Printf("%s\n%s\n", resp.Status, b)
		if resp.StatusCode != http.StatusOK {
			os.Exit(1)
		}
	case "dns":
		lookup(os.Args[2], os.Args[3])
	default:
		fmt.Fprintln(os.Stderr, "podagent: unknown command", os.Args[1])
		os.Exit(2)
	}
}

// lookup prints name's IPv4 addresses as resolver (host:port) answers them over UDP, or the error
// (and exits 1).
func lookup(resolver, name string) {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "udp", resolver)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	addrs, err := r.LookupNetIP(ctx, "ip4", name)
	cancel()
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println(addrs)
}

// answer serves on l; when the listener is taken away (a kill terminates the agent's sockets,
// listeners included), it listens on addr again, once it may.
func answer(addr string, l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			l.Close()
			for l, err = net.Listen("tcp", addr); err != nil; l, err = net.Listen("tcp", addr) {
				time.Sleep(200 * time.Millisecond)
			}
			continue
		}
		c.Write([]byte("tether-k8s\n"))
		c.Close()
	}
}

// waitForTerm reaps children (PID 1 of a container inherits orphans) until SIGTERM or SIGINT.
func waitForTerm() {
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

// appendByte appends a byte to file path (a static binary still runs).
func appendByte(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	_, err = f.Write([]byte{0})
	return errors.Join(err, f.Close())
}

// exitOn prints err and exits 1, when there is one.
func exitOn(err error) {
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
}
