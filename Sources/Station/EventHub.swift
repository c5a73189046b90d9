import ControlProtocol
import Foundation
import Synchronization

/// Fans events out to every subscriber (`watch` connections, the systemd notifier) without
/// ever blocking the station, and without ever dropping a state change.
///
/// Each subscriber has its own queue. Every job state change, device event and reload is
/// delivered, in order. Only progress is coalesced: when the newest pending event of a job
/// differs from a newer one in nothing but its progress, the newer one takes its place, so
/// a watcher that reads slowly gets fresh progress instead of a backlog of stale progress.
///
/// A subscriber that falls `backlogLimit` events behind even so would need a queue without
/// bound. It is ended instead: its sequence finishes and `overflowed` says so, so that its
/// owner tells the client and disconnects it. Dropping the oldest events (what this hub did
/// before) lost final states, which a watcher then waited for forever: a hole it was never
/// told about.
final class EventHub: Sendable {
    private let queues = Mutex<[ObjectIdentifier: EventQueue]>([:])
    private let published = Atomic<Int>(0)
    let backlogLimit: Int

    init(backlogLimit: Int = EventSubscription.defaultBacklogLimit) {
        self.backlogLimit = backlogLimit
    }

    func subscribe() -> EventSubscription {
        let queue = EventQueue(limit: backlogLimit)
        queues.withLock { $0[ObjectIdentifier(queue)] = queue }
        return EventSubscription(queue: queue) { [weak self] in
            _ = self?.queues.withLock { $0.removeValue(forKey: ObjectIdentifier(queue)) }
        }
    }

    /// How many events were published so far.
    var generation: Int { published.load(ordering: .acquiring) }

    func publish(_ event: Event) {
        // Counted first: whoever sees the old count has not yet missed this event's change.
        published.add(1, ordering: .releasing)
        let targets = queues.withLock { Array($0.values) }
        var overflowed: [ObjectIdentifier] = []
        for queue in targets where !queue.push(event) { overflowed.append(ObjectIdentifier(queue)) }
        if !overflowed.isEmpty {
            queues.withLock { for id in overflowed { $0.removeValue(forKey: id) } }
        }
    }

    var subscriberCount: Int { queues.withLock { $0.count } }
}

/// One subscriber's events, in order, until it ends: iterate it once. Ends (nil) when the
/// iterating task is cancelled, when the subscription is released, or when the subscriber
/// fell too far behind — then `overflowed` is true.
public final class EventSubscription: AsyncSequence, Sendable {
    public typealias Element = Event
    public typealias Failure = Never

    /// State changes a subscriber may have pending before it is ended as too slow. Progress
    /// is coalesced, so this counts real changes: a few per job.
    public static let defaultBacklogLimit = 512

    private let queue: EventQueue
    private let unsubscribe: @Sendable () -> Void

    init(queue: EventQueue, unsubscribe: @escaping @Sendable () -> Void) {
        self.queue = queue
        self.unsubscribe = unsubscribe
    }

    deinit {
        queue.end(.cancelled)
        unsubscribe()
    }

    /// True once the subscriber fell `defaultBacklogLimit` state changes behind and its
    /// pending events were released.
    public var overflowed: Bool { queue.endReason == .overflowed }

    /// How many state changes were pending when the subscription overflowed.
    public var backlogLimit: Int { queue.limit }

    public struct AsyncIterator: AsyncIteratorProtocol {
        let subscription: EventSubscription
        public mutating func next() async -> Event? { await subscription.queue.next() }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(subscription: self) }
}

final class EventQueue: Sendable {
    enum EndReason: Equatable { case cancelled, overflowed }

    private struct State {
        var events: [Event] = []
        var head = 0
        var waiter: CheckedContinuation<Event?, Never>?
        var ended: EndReason?
        var pending: Int { events.count - head }
    }

    let limit: Int
    private let state = Mutex(State())

    init(limit: Int) { self.limit = limit }

    var endReason: EndReason? { state.withLock { $0.ended } }

    /// Queues `event`; false when that made the subscriber overflow (it is ended then).
    func push(_ event: Event) -> Bool {
        let (waiter, accepted): (CheckedContinuation<Event?, Never>?, Bool) = state.withLock { s in
            if s.ended != nil { return (nil, s.ended != .overflowed) }
            if let waiter = s.waiter {
                s.waiter = nil
                return (waiter, true)
            }
            if event.kind == .job, let id = event.job?.id,
               let last = s.events[s.head...].lastIndex(where: { $0.kind == .job && $0.job?.id == id }),
               Self.supersedes(event, s.events[last]) {
                s.events[last] = event
                return (nil, true)
            }
            if s.pending >= limit {
                s.ended = .overflowed
                s.events = []
                s.head = 0
                return (nil, false)
            }
            if s.head > 64 && s.head * 2 > s.events.count {
                s.events.removeFirst(s.head)
                s.head = 0
            }
            s.events.append(event)
            return (nil, true)
        }
        waiter?.resume(returning: event)
        return accepted
    }

    func next() async -> Event? {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Event?, Never>) in
                let ready: Event?? = state.withLock { s in
                    if s.ended == .cancelled { return .some(nil) }
                    if s.head < s.events.count {
                        let event = s.events[s.head]
                        s.head += 1
                        if s.head == s.events.count { s.events.removeAll(keepingCapacity: s.events.count <= 64); s.head = 0 }
                        return .some(event)
                    }
                    if s.ended != nil { return .some(nil) }
                    s.waiter = continuation
                    return .none
                }
                if case .some(let event) = ready { continuation.resume(returning: event) }
            }
        } onCancel: {
            end(.cancelled)
        }
    }

    /// Ends the queue: pending events are released and a waiting `next` returns nil.
    func end(_ reason: EndReason) {
        let waiter = state.withLock { s -> CheckedContinuation<Event?, Never>? in
            if s.ended == nil { s.ended = reason }
            s.events = []
            s.head = 0
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume(returning: nil)
    }

    /// A job event that differs from the pending one only in progress (and the time it was
    /// taken) replaces it: nothing a watcher must see is lost.
    static func supersedes(_ new: Event, _ old: Event) -> Bool {
        guard new.kind == .job, old.kind == .job, var a = old.job, var b = new.job, a.id == b.id, old.message == new.message else { return false }
        a.progress = nil
        b.progress = nil
        a.updated = b.updated
        return a == b
    }
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
