// Command tetherctl talks to tetherd: it launches agents under an identity (run), shows what
// tetherd enforces (status, agents), and changes an agent's mode or killed flag.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// `tetherctl run` starts itself again as the process that confines the agent and becomes it.
	if len(os.Args) > 1 && os.Args[1] == confineStage {
		os.Exit(confineAndRun(os.Args[2:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	code, err := run(ctx, os.Args[1:])
	if err != nil {
		var exit exitCode
		if !errors.As(err, &exit) {
			fmt.Fprintln(os.Stderr, "tetherctl:", err)
		}
	}
	os.Exit(code)
}

// exitCode is the status of a command tetherctl ran, passed through as its own.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func run(ctx context.Context, args []string) (int, error) {
	cmd := newRoot()
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	var exit exitCode
	switch {
	case errors.As(err, &exit):
		return int(exit), err
	case err != nil:
		return 1, err
	}
	return 0, nil
}
