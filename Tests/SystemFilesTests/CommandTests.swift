// TestSupport.Command: every test of the project runs its peers through it.

import Foundation
import Testing
import TestSupport

@Suite("Command helper")
struct CommandTests {
    @Test func capturesStatusStdoutAndStderrSeparately() throws {
        let output = try Command.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
        #expect(output.status == 3)
        #expect(output.stdout == "out\n")
        #expect(output.stderr == "err\n")
        #expect(!output.succeeded)
    }

    @Test func feedsStdin() throws {
        let output = try Command.check(["tr", "a-z", "A-Z"], input: "provision\n")
        #expect(output.stdout == "PROVISION\n")
    }

    @Test func stdinIsEmptyWhenNoInputIsGiven() throws {
        let output = try Command.check(["wc", "-c"])
        #expect(output.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
    }

    @Test func checkThrowsWithTheCommandLineAndStderr() throws {
        do {
            try Command.check(["sh", "-c", "echo broken card >&2; exit 1"])
            Issue.record("check did not throw")
        } catch let error as CommandError {
            #expect(error.description.contains("sh -c"))
            #expect(error.description.contains("broken card"))
            #expect(error.output?.status == 1)
        }
    }

    @Test func reportsAMissingProgram() throws {
        #expect(throws: CommandError.self) { try Command.run(["provision-no-such-program"]) }
    }

    @Test func reportsDeathBySignalLikeAShell() throws {
        let output = try Command.run(["sh", "-c", "kill -TERM $$"])
        #expect(output.status == 128 + SIGTERM)
    }

    @Test func killsACommandThatOverrunsItsTimeout() throws {
        let start = ContinuousClock.now
        let output = try Command.run(["sleep", "30"], timeout: .milliseconds(300))
        #expect(output.timedOut)
        #expect(output.status == 128 + SIGKILL)
        #expect(ContinuousClock.now - start < .seconds(10))
    }

    @Test func returnsWhileADaemonizedGrandchildKeepsStdoutOpen() throws {
        // What `systemd-udevd --daemon` does; a pipe reader would wait for it forever.
        let start = ContinuousClock.now
        let output = try Command.check(["sh", "-c", "sleep 20 & echo started"])
        #expect(output.stdout == "started\n")
        #expect(ContinuousClock.now - start < .seconds(10))
    }

    @Test func findsProgramsInSbinEvenWithAShortPath() throws {
        #expect(Command.resolve("losetup") != nil)
        #expect(Command.resolve("/bin/sh") == "/bin/sh")
        #expect(Command.resolve("/nonexistent/sh") == nil)
    }

    @Test func doesNotLeakOpenDescriptorsIntoChildren() throws {
        let fd = open("/dev/null", O_RDONLY)  // deliberately without O_CLOEXEC
        defer { close(fd) }
        let output = try Command.check(["sh", "-c", "ls /proc/$$/fd"])
        let descriptors = output.stdout.split(separator: "\n").compactMap { Int32($0) }
        #expect(!descriptors.contains(fd))
    }
}
