import Foundation

/// Runs blocking work (a child process waited for, a status polled with a deadline, a
/// synchronous read) on a thread of its own and awaits it.
///
/// Swift's concurrency pool has one thread per core: two on the CI machine. A test that
/// blocks a pool thread stalls every other async test of the process for as long as it
/// blocks, and their event-driven waits then run into their deadlines (CI failed so).
public func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread { continuation.resume(with: Result { try body() }) }
        thread.stackSize = 1 << 20
        thread.start()
    }
}

/// `offPool` for work that cannot throw.
public func offPool<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: body()) }
        thread.stackSize = 1 << 20
        thread.start()
    }
}
