#if canImport(Glibc)
import Glibc
#endif
import ProvisionCShims

/// A pipe that bytes pass through, or wait in, with splice(2): as page references, never
/// copied. Its descriptors close with it.
///
/// A splicing card's chunks pass through one (`SplicePipe()`), and so its chunk: 4 MiB (an SD
/// card's erase block) where the kernel allows a pipe that large, else 1 MiB, the most
/// `/proc/sys/fs/pipe-max-size` gives a process without CAP_SYS_RESOURCE by default (the
/// pages a pipe refers to count against its user's `pipe-user-pages-soft`, 64 MiB: 64
/// cards of 1 MiB). Nil when not even 1 MiB is allowed: chunks of a pipe's 64 KiB would
/// cost a card speed, so the card takes the buffered path. The capacity probe keeps the
/// first runs it overwrites in pipes of their own (`CapacityProbe.Stash`).
public final class SplicePipe {
    public let read: Int32
    public let write: Int32
    public let capacity: Int
    /// A card writer's sizes, largest first.
    static let sizes = [4 << 20, 1 << 20]

    /// A card writer's pipe.
    convenience init?() {
        self.init(sizes: SplicePipe.sizes, atLeast: 1 << 20)
    }

    /// A pipe of the first of `sizes` the kernel gives that holds `minimum` bytes; nil when
    /// none does.
    public init?(sizes: [Int], atLeast minimum: Int) {
        var fds: [Int32] = [-1, -1]
        guard provision_pipe_cloexec(&fds) == 0 else { return nil }
        guard let capacity = sizes.lazy.map({ Int(provision_pipe_resize(fds[1], Int32(clamping: $0))) }).first(where: { $0 >= minimum }) else {
            Syscall.close(fds[0])
            Syscall.close(fds[1])
            return nil
        }
        read = fds[0]
        write = fds[1]
        self.capacity = capacity
    }

    deinit {
        Syscall.close(read)
        Syscall.close(write)
    }

    /// Moves `count` bytes of `fd` from `offset` into the pipe; how many went in (fewer at
    /// the end of `fd`, or when it fails).
    public func fill(from fd: Int32, at offset: UInt64, count: Int) -> Int {
        var done = 0
        while done < count, case .success(let k) = Syscall.retrying({ provision_splice(fd, Int64(offset) + Int64(done), write, -1, UInt(count - done)) }), k > 0 {
            done += k
        }
        return done
    }

    /// Moves `count` bytes out of the pipe onto `fd` at `offset`; how many went (fewer when
    /// `fd` takes no more, or fails).
    public func empty(onto fd: Int32, at offset: UInt64, count: Int) -> Int {
        var done = 0
        while done < count, case .success(let k) = Syscall.retrying({ provision_splice(read, -1, fd, Int64(offset) + Int64(done), UInt(count - done)) }), k > 0 {
            done += k
        }
        return done
    }
}
