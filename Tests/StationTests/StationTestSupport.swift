import ControlProtocol
import Foundation
import Logging
@testable import Station
import TestSupport

func filler(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
}

/// Waits for events of an already subscribed stream until `done` says so, or fails after
/// `seconds` (subscribe before causing the events, or they may pass unseen).
func waitFor(_ events: EventSubscription, seconds: Double = 600, until done: @escaping @Sendable (Event) -> Bool) async throws {
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
