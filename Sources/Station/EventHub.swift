import ControlProtocol
import Foundation

/// Fans events out to every `watch` connection. A slow watcher loses old progress events
/// (bounded buffer), never blocks the station.
final class EventHub: @unchecked Sendable {
    private let lock = NSLock()
    private var continuations: [UUID: AsyncStream<Event>.Continuation] = [:]

    func subscribe() -> AsyncStream<Event> {
        let id = UUID()
        let (stream, continuation) = AsyncStream<Event>.makeStream(bufferingPolicy: .bufferingNewest(1024))
        continuation.onTermination = { [weak self] _ in self?.lock.withLock { _ = self?.continuations.removeValue(forKey: id) } }
        lock.withLock { continuations[id] = continuation }
        return stream
    }

    func publish(_ event: Event) {
        let targets = lock.withLock { Array(continuations.values) }
        for c in targets { c.yield(event) }
    }

    var subscriberCount: Int { lock.withLock { continuations.count } }
}

/// Runs `body` on the cooperative pool and waits for it from a plain thread. Used by job
/// threads to hand state changes to the station in order, and to wait until the ledger holds
/// them before going on.
func blockingAwait<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let semaphore = DispatchSemaphore(value: 0)
    let box = ResultBox<T>()
    Task {
        box.value = await body()
        semaphore.signal()
    }
    semaphore.wait()
    return box.value!
}

private final class ResultBox<T>: @unchecked Sendable {
    var value: T?
}
