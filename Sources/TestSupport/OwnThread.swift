import Foundation
import Testing

/// Runs every job of a task on a thread of its own (`ownThread`'s executor).
public final class OwnThreadExecutor: TaskExecutor {
    public static let shared = OwnThreadExecutor()

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = asUnownedTaskExecutor()
        let thread = Thread { job.runSynchronously(on: executor) }
        thread.stackSize = 8 << 20
        thread.start()
    }
}

/// `.ownThread` on a suite or test: its tests run on threads of their own, not on Swift's
/// concurrency pool.
///
/// The pool has one thread per core, two on the CI machine, and Swift Testing runs a
/// synchronous test body on it: a suite of long synchronous tests (mkfs, cbootimage, a
/// daemon driven through 50 cards) held both threads for a minute or two at the start of a
/// full run, and every async test's next step (a replicator's connect, a child task that was
/// to start a writer) waited behind them until its ceiling ran out (CI failed so). The body
/// runs in the same task (task-locals, hence `#expect`, are the test's), only elsewhere.
public struct OwnThreadTrait: TestTrait, SuiteTrait, TestScoping {
    public var isRecursive: Bool { true }

    public func provideScope(for test: Test, testCase: Test.Case?,
                             performing function: @Sendable () async throws -> Void) async throws {
        guard testCase != nil else { return try await function() }
        try await withTaskExecutorPreference(OwnThreadExecutor.shared) { try await function() }
    }
}

extension Trait where Self == OwnThreadTrait {
    public static var ownThread: Self { Self() }
}
