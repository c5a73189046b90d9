// One bench for an integration test: a temp directory, the project's udev rules loaded into
// the real udevd, images, loop cards in named slots, a station.toml and the real provisiond.
// Everything is torn down by `close()`, in the order that lets go of devices: daemon,
// mounts, cards, rules, directory.

#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Synchronization
import TestSupport

final class StationBench: Sendable {
    /// Mode 0755: the control socket sits here and `nobody` must be able to reach it.
    let directory: String
    /// In every card label and slot glob, so that cards of other tests (and other test
    /// processes on the machine) never match this bench's slots.
    let token: String
    private let rules: InstalledUdevRules
    private let state = Mutex(Owned())

    private struct Owned {
        var cards: [LoopCard] = []
        var mounts: [String] = []
        var daemons: [DaemonProcess] = []
    }

    var socketPath: String { directory + "/control.sock" }
    var configPath: String { directory + "/station.toml" }
    var ledgerPath: String { directory + "/ledger.sqlite" }
    var logPath: String { directory + "/provisiond.log" }

    init() throws {
        var template = Array("/tmp/provision-integration-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw BenchError("cannot create a temporary directory in /tmp: \(String(cString: strerror(errno)))")
        }
        directory = String(cString: made)
        chmod(directory, 0o755)
        token = String(UInt64.random(in: 0...UInt64.max), radix: 36)
        do {
            // The rules assign GROUP="provision"; the daemon's socket and admin groups.
            try Command.check(["groupadd", "-f", "provision"])
            try Command.check(["groupadd", "-f", "provision-admin"])
            rules = try Udevd.ensureRunning().installRules(Udevd.projectRuleFiles())
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    deinit { close() }

    /// Stops every daemon, unmounts, detaches and deletes every card, unloads the rules
    /// and deletes the directory. Idempotent; never throws.
    func close() {
        let owned = state.withLock { s -> Owned in
            defer { s = Owned() }
            return s
        }
        for daemon in owned.daemons { daemon.stop() }
        for point in owned.mounts.reversed() { _ = try? Command.run(["umount", point]) }
        for card in owned.cards { card.close() }
        try? rules.remove()
        try? FileManager.default.removeItem(atPath: directory)
    }

    // MARK: - Images and cards

    /// An image of `bytes` random bytes (a multiple of 512, so that `LoopCard.sha256` can
    /// read exactly that much with O_DIRECT).
    func image(_ name: String, bytes: Int) throws -> String {
        let path = directory + "/" + name
        try Command.bash("head -c \(bytes) /dev/urandom > '\(path)'")
        guard let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int, size == bytes else {
            throw BenchError("could not make the \(bytes)-byte image \(path)")
        }
        return path
    }

    /// The label a card for `slot` gets; the slot's glob matches exactly this bench's card.
    func label(_ slot: String) -> String { "\(slot)-\(token)" }

    /// A loop card whose file name puts it into `slot` (nothing happens until udev tells the
    /// daemon, if one runs).
    @discardableResult
    func card(slot: String, size: Int64, options: LoopCard.Options = .init()) throws -> LoopCard {
        let card = try LoopCard(label: label(slot), size: size, options: options)
        state.withLock { $0.cards.append(card) }
        return card
    }

    /// Makes an ext4 file system on the card and mounts it under the bench directory.
    func mount(_ card: LoopCard) throws -> String {
        try Command.check(["mkfs.ext4", "-q", "-F", card.devicePath])
        let point = directory + "/mnt-" + card.name
        try FileManager.default.createDirectory(atPath: point, withIntermediateDirectories: true)
        try Command.check(["mount", card.devicePath, point])
        state.withLock { $0.mounts.append(point) }
        return point
    }

    /// Unmounts what `mount` mounted (also done by `close()`).
    func unmount(_ point: String) throws {
        try Command.check(["umount", point])
        state.withLock { $0.mounts.removeAll { $0 == point } }
    }

    // MARK: - Config and daemon

    struct Slot {
        var name: String
        var image: String
    }

    /// station.toml: one profile per slot (writing `image`, verified), loop cards allowed.
    /// `stationLines` go into [station] as they are (e.g. `max_clients = 4`).
    func writeConfig(_ slots: [Slot], maxDeviceSize: String? = nil, stationLines: [String] = []) throws {
        var text = """
            [station]
            name = "integration-\(token)"
            allow_loop_devices = true
            ledger = "\(ledgerPath)"
            cache_dir = "\(directory)/cache"
            admin_group = "provision-admin"

            """
        if let maxDeviceSize { text += "max_device_size = \"\(maxDeviceSize)\"\n" }
        for line in stationLines { text += line + "\n" }
        for slot in slots {
            text += """

                [profiles.p\(slot.name)]
                image = "\(slot.image)"
                verify = true

                [[slots]]
                name = "\(slot.name)"
                match = "loop:*/provision-card-\(label(slot.name))-*"
                profile = "p\(slot.name)"

                """
        }
        try text.write(toFile: configPath, atomically: true, encoding: .utf8)
    }

    /// Starts provisiond on this bench's config and socket; stopped by `close()`.
    @discardableResult
    func startDaemon(launcher: [String] = [], extraArguments: [String] = []) throws -> DaemonProcess {
        let daemon = try DaemonProcess(configPath: configPath, socketPath: socketPath, logPath: logPath, extraArguments: extraArguments, launcher: launcher)
        state.withLock { $0.daemons.append(daemon) }
        return daemon
    }

    /// The process id of the daemon started last, while it runs.
    var daemonPID: pid_t? { state.withLock { $0.daemons.last }?.pid }

    // MARK: - Asking the daemon (through the CLI, as an operator would)

    func cli(_ arguments: [String], prefix: [String] = []) throws -> CommandOutput {
        try Command.run(prefix + [DaemonProcess.cliBinary] + arguments + ["--socket", socketPath], timeout: .seconds(60))
    }

    func status() throws -> StationStatus {
        try Self.decode(StationStatus.self, try checked(["status", "--json"]))
    }

    /// The ledger's jobs, newest first.
    func jobs() throws -> [JobRecord] {
        try Self.decode([JobRecord].self, try checked(["jobs", "--json"]))
    }

    /// The `provision status` table line of a slot.
    func statusLine(slot: String) throws -> String {
        let table = try checked(["status"])
        guard let line = table.split(separator: "\n").first(where: { $0.hasPrefix(slot + " ") }) else {
            throw BenchError("`provision status` shows no line for slot \(slot):\n\(table)")
        }
        return String(line)
    }

    /// Polls `provision status --json` until `condition` holds; throws with the last status
    /// and the daemon's log after `timeout`.
    @discardableResult
    func waitForStatus(_ what: String, timeout: Duration = .seconds(60),
                       until condition: (StationStatus) -> Bool) throws -> StationStatus {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        var last: StationStatus?
        while ContinuousClock.now < deadline {
            let status = try self.status()
            if condition(status) { return status }
            last = status
            usleep(100_000)
        }
        throw BenchError("timed out after \(timeout) waiting for \(what); last status: \(last.map { "\($0)" } ?? "none")\nlog:\n\(log)")
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// A `watch` connection: every event the daemon announces from now on, in order.
    func watch() throws -> RawConnection {
        let connection = try RawConnection(path: socketPath)
        _ = try connection.readMessage()  // hello
        connection.send("{\"id\":1,\"method\":\"watch\"}\n")
        guard try connection.readMessage().result?.status != nil else { throw BenchError("watch did not answer with the status") }
        return connection
    }

    /// Reads `watcher`'s events until one satisfies `condition` (a signal from the daemon,
    /// not a guess at how long it takes); throws after `timeout`.
    @discardableResult
    func waitForEvent(_ watcher: RawConnection, _ what: String, timeout: Duration = .seconds(30),
                      until condition: (Event) -> Bool) throws -> Event {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { throw BenchError("no event for \(what) within \(timeout)\nlog:\n\(log)") }
            let message = try watcher.readMessage(timeout: left)
            if let event = message.event, condition(event) { return event }
        }
    }

    private func checked(_ arguments: [String]) throws -> String {
        let output = try cli(arguments)
        guard output.succeeded else { throw BenchError("\(output)\nlog:\n\(log)") }
        return output.stdout
    }

    /// The CLI's `--json` output (ISO 8601 dates).
    static func decode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode(type, from: Data(text.utf8))
    }
}

extension StationStatus {
    func slot(_ name: String) -> SlotStatus? { slots.first { $0.name == name } }
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// SHA-256 (hex) of a file, by sha256sum.
func sha256(ofFile path: String) throws -> String {
    let output = try Command.check(["sha256sum", path])
    return String(output.stdout.prefix(64))
}

func getGID(_ group: String) throws -> gid_t {
    guard let entry = getgrnam(group) else { throw BenchError("no group named \(group)") }
    return entry.pointee.gr_gid
}
