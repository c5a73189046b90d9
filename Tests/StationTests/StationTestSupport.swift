import ControlProtocol
import Foundation
import Logging
@testable import Station
import TestSupport

/// A temp directory that removes itself.
final class StationScratch: @unchecked Sendable {
    let path: String
    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("provision-station-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { (path as NSString).appendingPathComponent(name) }
    @discardableResult
    func write(_ name: String, _ bytes: [UInt8]) throws -> String {
        try Data(bytes).write(to: URL(fileURLWithPath: file(name)))
        return file(name)
    }
}

func filler(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
}

/// Waits for events of an already subscribed stream until `done` says so, or fails after
/// `seconds` (subscribe before causing the events, or they may pass unseen).
func waitFor(_ events: AsyncStream<Event>, seconds: Double = 120, until done: @escaping @Sendable (Event) -> Bool) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask {
            for await e in events where done(e) { return }
        }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            throw StationTestError(description: "timed out after \(seconds) s")
        }
        try await group.next()
        group.cancelAll()
    }
}

struct StationTestError: Error, CustomStringConvertible { let description: String }

let quietLogger: Logger = {
    var l = Logger(label: "test")
    l.logLevel = .critical
    return l
}()
