// A real systemd-udevd for tests, with the project's rules loaded.
//
// Tests of every target run in one process and in parallel, and other test processes may
// share the machine: everything that changes udevd's state (starting it, adding or
// removing rule files, reloading) happens under one flock on /run/provision-test-udevd.lock.
// flock locks belong to an open file description, so two threads of one process exclude
// each other as well as two processes do.
//
// A udevd that this fixture did not start is never stopped; one that it started is left
// running for the next test (starting one costs a second, and stopping it under a test
// that still waits for an event would hang that test).

#if canImport(Glibc)
import Glibc
#endif
import Foundation

public struct UdevdError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// Handle on the running udevd. Cheap to copy; holds no resources.
public struct Udevd: Sendable {
    /// True when this call started the daemon (false when one already answered the ping).
    public let startedHere: Bool

    static let lockPath = "/run/provision-test-udevd.lock"
    /// udevd's stderr when the fixture starts it: rule syntax errors and "Unknown group"
    /// land here.
    public static let logPath = "/run/provision-test-udevd.log"
    static let rulesDirectory = "/run/udev/rules.d"

    /// Makes sure a systemd-udevd answers `udevadm control --ping`, starting
    /// `systemd-udevd --daemon` when none does, and waits until it answers.
    public static func ensureRunning(timeout: Duration = .seconds(15)) throws -> Udevd {
        if ping() { return Udevd(startedHere: false) }
        return try withLock {
            if ping() { return Udevd(startedHere: false) }
            let candidates: [String] = ["/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd"]
            guard let daemon = candidates.first(where: { access($0, X_OK) == 0 })
            else {
                throw UdevdError(description: "systemd-udevd is not installed: apt-get install udev")
            }
            try Command.check([
                "sh", "-c", "exec \"$0\" --daemon </dev/null >>\(logPath) 2>&1", daemon,
            ])
            let deadline = ContinuousClock.now.advanced(by: timeout)
            while !ping() {
                guard ContinuousClock.now < deadline else {
                    throw UdevdError(
                        description: "started \(daemon) --daemon but it does not answer "
                            + "`udevadm control --ping` after \(timeout); see \(logPath)")
                }
                usleep(50_000)
            }
            return Udevd(startedHere: true)
        }
    }

    /// Whether a udevd answers on /run/udev/control.
    public static func ping() -> Bool {
        (try? Command.run(["udevadm", "control", "--ping", "--timeout=2"]).succeeded) ?? false
    }

    /// Runs a udevadm command that talks to udevd's control socket. Tests running in
    /// parallel fill that socket's small backlog ("Failed to send reload request: Resource
    /// temporarily unavailable"), so a failure is retried for a few seconds.
    @discardableResult
    static func control(_ arguments: [String]) throws -> CommandOutput {
        var attempt = 0
        while true {
            let output = try Command.run(arguments, timeout: .seconds(120))
            attempt += 1
            if output.succeeded || attempt >= 30 || output.timedOut {
                guard output.succeeded else { throw CommandError(arguments: arguments, output: output, errno: nil) }
                return output
            }
            usleep(UInt32(min(attempt, 10)) * 50_000)
        }
    }

    /// Copies rule files into /run/udev/rules.d under names unique to this call (the numeric
    /// prefix is kept so the order among udev's own rules is unchanged) and reloads udevd.
    /// Call `remove()` on the result when done (`withRules` does it for you). Two tests
    /// installing the same file at once is fine: both copies apply the same assignments.
    public func installRules(_ files: [String]) throws -> InstalledUdevRules {
        let token = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var installed: [String] = []
        try Udevd.withLock {
            try FileManager.default.createDirectory(
                atPath: Udevd.rulesDirectory, withIntermediateDirectories: true)
            do {
                for file in files {
                    let name = URL(fileURLWithPath: file).deletingPathExtension().lastPathComponent
                    let target = "\(Udevd.rulesDirectory)/\(name)-test-\(token).rules"
                    let text = try String(contentsOfFile: file, encoding: .utf8)
                    try text.write(toFile: target, atomically: true, encoding: .utf8)
                    installed.append(target)
                }
                try Udevd.control(["udevadm", "control", "--reload"])
            } catch {
                installed.forEach { unlink($0) }
                throw error
            }
        }
        return InstalledUdevRules(paths: installed)
    }

    /// Installs `files`, runs `body`, removes the files again (also when `body` throws).
    public func withRules<T>(_ files: [String], _ body: () throws -> T) throws -> T {
        let rules = try installRules(files)
        defer { try? rules.remove() }
        return try body()
    }

    /// `udevadm settle`: waits until udevd's event queue is empty.
    public func settle(timeout: Duration = .seconds(90)) throws {
        let seconds = max(1, Int(timeout.components.seconds))
        try Udevd.control(["udevadm", "settle", "--timeout=\(seconds)"])
    }

    /// `udevadm trigger --action=ACTION --settle DEVICE`: replays an event for one device,
    /// e.g. so that rules installed after the device appeared apply to it.
    public func trigger(_ devicePath: String, action: String = "change") throws {
        try Udevd.control(["udevadm", "trigger", "--action=\(action)", "--settle", devicePath])
    }

    /// udev's database entry for a device: `udevadm info --query=property`.
    public func properties(of devicePath: String) throws -> [String: String] {
        let output = try Command.check(["udevadm", "info", "--query=property", "--name=\(devicePath)"])
        var properties: [String: String] = [:]
        for line in output.stdout.split(separator: "\n") {
            guard let equals = line.firstIndex(of: "=") else { continue }
            properties[String(line[..<equals])] = String(line[line.index(after: equals)...])
        }
        return properties
    }

    /// Tags the latest event left on the device (CURRENT_TAGS). This is what the daemon
    /// must look at: TAGS also keeps every tag set since the device's `add`.
    public func currentTags(of devicePath: String) throws -> Set<String> {
        Self.tags(from: try properties(of: devicePath)["CURRENT_TAGS"])
    }

    /// Every tag ever set on the device since its `add` (TAGS, sticky).
    public func stickyTags(of devicePath: String) throws -> Set<String> {
        Self.tags(from: try properties(of: devicePath)["TAGS"])
    }

    /// Settles, then re-reads the device's properties every 50 ms until `condition` holds
    /// or `timeout` passes; returns the last properties seen either way. Use it right after
    /// an attach or a detach: the kernel's uevent may reach udevd after `settle` returned.
    public func waitForProperties(
        of devicePath: String, timeout: Duration = .seconds(60),
        until condition: ([String: String]) -> Bool
    ) throws -> [String: String] {
        try settle()
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            let properties = (try? self.properties(of: devicePath)) ?? [:]
            if condition(properties) || ContinuousClock.now >= deadline { return properties }
            usleep(50_000)
        }
    }

    /// The tags of a CURRENT_TAGS or TAGS value (":provision:systemd:").
    public static func tags(from value: String?) -> Set<String> {
        Set((value ?? "").split(separator: ":").map(String.init))
    }

    /// The project's rule files in this checkout: udev-rules/70-provision.rules and, for
    /// tests and demos, udev-rules/99-provision-test-loop.rules (loop cards).
    public static func projectRuleFiles(includingTestLoopRule: Bool = true) -> [String] {
        let root = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        var files = [root.appendingPathComponent("udev-rules/70-provision.rules").path]
        if includingTestLoopRule {
            files.append(root.appendingPathComponent("udev-rules/99-provision-test-loop.rules").path)
        }
        return files
    }

    static func withLock<T>(_ body: () throws -> T) throws -> T {
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw UdevdError(description: "cannot open \(lockPath): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        while flock(fd, LOCK_EX) != 0 {
            guard errno == EINTR else {
                throw UdevdError(description: "cannot lock \(lockPath): \(String(cString: strerror(errno)))")
            }
        }
        defer { flock(fd, LOCK_UN) }
        return try body()
    }
}

/// Rule files a test put into /run/udev/rules.d.
public final class InstalledUdevRules: Sendable {
    /// Where the copies are (e.g. /run/udev/rules.d/70-provision-test-4242-17.rules).
    public let paths: [String]

    init(paths: [String]) { self.paths = paths }

    /// Deletes the copies and reloads udevd. Calling it again does nothing.
    public func remove() throws {
        try Udevd.withLock {
            var removedAny = false
            for path in paths where unlink(path) == 0 { removedAny = true }
            if removedAny { try Udevd.control(["udevadm", "control", "--reload"]) }
        }
    }

    deinit { try? remove() }
}
