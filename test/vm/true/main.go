// Command true exits with status 0. The test guest of make test-vm has no coreutils; the
// differential test copies this program for the tools its policy names.
package main

func main() {}
