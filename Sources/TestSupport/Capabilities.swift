import Foundation
import ProvisionCShims

/// CAP_SYS_RESOURCE (linux/capability.h): what lets root size a pipe past
/// /proc/sys/fs/pipe-max-size. The packaged unit does not have it.
public let capSysResource: Int32 = 24
/// CAP_SYS_ADMIN: with it (or CAP_SYS_RESOURCE) a user's pipes are not held to
/// /proc/sys/fs/pipe-user-pages-soft. The packaged unit does not have it either.
public let capSysAdmin: Int32 = 21

public struct CapabilityError: Error, CustomStringConvertible {
    public let description: String
}

/// Runs `body` on a thread of its own without `capability` in its effective set (and so in
/// every thread it starts), and returns what it returned: a piece of the daemon as a process
/// without that capability would run it, while the test process keeps its own.
public func withoutCapability<T: Sendable>(_ capability: Int32, _ body: @escaping @Sendable () throws -> T) throws -> T {
    let done = DispatchSemaphore(value: 0)
    nonisolated(unsafe) var outcome: Result<T, any Error> = .failure(CapabilityError(description: "the thread did not run"))
    let thread = Thread {
        defer { done.signal() }
        guard provision_drop_effective_capability(capability) == 0 else {
            outcome = .failure(CapabilityError(description: "cannot drop capability \(capability): \(String(cString: strerror(errno)))"))
            return
        }
        outcome = Result { try body() }
    }
    thread.start()
    done.wait()
    return try outcome.get()
}
