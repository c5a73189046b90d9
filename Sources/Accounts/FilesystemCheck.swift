import Foundation

/// The verdict of `e2fsck -fn` on one partition: forced full check, answering "no" to
/// every repair, so it reads and never writes.
public struct FilesystemCheck: Sendable, Equatable {
    /// e2fsck exit status: 0 means no errors; 4 means errors left uncorrected (-n), 8 an
    /// operational error.
    public var exitStatus: Int32
    /// stdout and stderr of e2fsck, for the job's log when it is not clean.
    public var output: String
    public var clean: Bool { exitStatus == 0 }

    /// e2fsck opens `image?offset=N` through the same unix I/O manager options as
    /// libext2fs, so a partition inside a whole-disk image or device is checked in place.
    static func run(target: String, offset: UInt64, e2fsck: String = "/usr/sbin/e2fsck") throws(AccountsError) -> FilesystemCheck {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: FileManager.default.isExecutableFile(atPath: e2fsck) ? e2fsck : "/sbin/e2fsck")
        process.arguments = ["-fn", offset == 0 ? target : "\(target)?offset=\(offset)"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch {
            throw AccountsError(.checker, "cannot run e2fsck (\(process.executableURL!.path)): \(error); install e2fsprogs")
        }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return FilesystemCheck(exitStatus: process.terminationStatus, output: String(decoding: data, as: UTF8.self))
    }
}
