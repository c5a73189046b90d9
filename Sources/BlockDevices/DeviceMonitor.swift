#if canImport(Glibc)
import Glibc
#endif
import CUdev
import Foundation
import ProvisionCShims

/// A USB device in NVIDIA's recovery mode, as udev reports it.
public struct RecoveryUSBDevice: Sendable, Equatable, Codable {
    public var syspath: String
    public var devnode: String?
    public var vendorID: UInt16
    public var productID: UInt16
    public var busNumber: Int
    public var deviceAddress: Int
    public var serial: String?

    public init(syspath: String, devnode: String?, vendorID: UInt16, productID: UInt16, busNumber: Int, deviceAddress: Int, serial: String?) {
        self.syspath = syspath; self.devnode = devnode; self.vendorID = vendorID; self.productID = productID
        self.busNumber = busNumber; self.deviceAddress = deviceAddress; self.serial = serial
    }
}

public enum DeviceEvent: Sendable {
    public enum Action: String, Sendable { case add, change, remove }
    case block(Action, DeviceFacts)
    case recovery(Action, RecoveryUSBDevice)
}

/// Discovery through libudev (DESIGN.md §2): enumerate once, then listen. Nothing is polled —
/// a dedicated thread sleeps in poll(2) on the monitor socket until the kernel or udevd has
/// something to say.
public final class DeviceMonitor: @unchecked Sendable {
    public enum Source: String, Sendable { case udev, kernel }

    private let udev: OpaquePointer
    private let monitor: OpaquePointer
    public let source: Source
    private var wakeup: [Int32] = [-1, -1]
    private var thread: Thread?

    /// Opens the monitor. With no udevd running (no /run/udev/control), it listens to the
    /// kernel's own uevents instead: device facts then lack udev's properties (ID_PATH,
    /// tags), which the caller should say once in its log.
    public init() throws(BlockDeviceError) {
        guard let udev = udev_new() else { throw BlockDeviceError(.udev, "libudev: udev_new failed") }
        let source: Source = FileManager.default.fileExists(atPath: "/run/udev/control") ? .udev : .kernel
        guard let monitor = udev_monitor_new_from_netlink(udev, source.rawValue) else {
            udev_unref(udev)
            throw BlockDeviceError(.udev, "libudev: cannot open the \(source.rawValue) uevent socket (needs root or CAP_NET_ADMIN)")
        }
        udev_monitor_filter_add_match_subsystem_devtype(monitor, "block", "disk")
        udev_monitor_filter_add_match_subsystem_devtype(monitor, "usb", "usb_device")
        // A station that writes many cards at once produces bursts of events.
        udev_monitor_set_receive_buffer_size(monitor, 4 << 20)
        guard udev_monitor_enable_receiving(monitor) >= 0 else {
            udev_monitor_unref(monitor)
            udev_unref(udev)
            throw BlockDeviceError(.udev, "libudev: cannot start receiving uevents")
        }
        self.udev = udev
        self.monitor = monitor
        self.source = source
        guard pipe(&wakeup) == 0 else { throw BlockDeviceError(.udev, "pipe failed") }
        for fd in wakeup { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    }

    deinit {
        stop()
        udev_monitor_unref(monitor)
        udev_unref(udev)
        for fd in wakeup where fd >= 0 { close(fd) }
    }

    /// The devices present now: whole block disks and recovery-mode Tegra boards.
    /// Call after `init` (the monitor is already listening, so nothing falls between).
    public func enumerate() -> [DeviceEvent] {
        var out: [DeviceEvent] = []
        for (subsystem, devtype) in [("block", "disk"), ("usb", "usb_device")] {
            guard let e = udev_enumerate_new(udev) else { continue }
            defer { udev_enumerate_unref(e) }
            udev_enumerate_add_match_subsystem(e, subsystem)
            udev_enumerate_add_match_property(e, "DEVTYPE", devtype)
            udev_enumerate_scan_devices(e)
            var entry = udev_enumerate_get_list_entry(e)
            while let item = entry {
                if let dev = udev_device_new_from_syspath(udev, udev_list_entry_get_name(item)) {
                    if let ev = Self.event(from: dev, action: .add) { out.append(ev) }
                    udev_device_unref(dev)
                }
                entry = udev_list_entry_get_next(item)
            }
        }
        return out
    }

    /// Starts the listening thread; `handler` runs on it for each event, in order.
    public func start(_ handler: @escaping @Sendable (DeviceEvent) -> Void) {
        let fd = udev_monitor_get_fd(monitor)
        let wake = wakeup[0]
        let monitor = UnsafeSendable(monitor)
        let t = Thread {
            provision_name_thread("prov-udev")
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            while true {
                let r = poll(&fds, 2, -1)
                if r < 0 { if errno == EINTR { continue }; return }
                if fds[1].revents != 0 { return }
                guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
                while let dev = udev_monitor_receive_device(monitor.value) {
                    let actionName = udev_device_get_action(dev).map { String(cString: $0) } ?? "change"
                    if let action = DeviceEvent.Action(rawValue: actionName), let ev = Self.event(from: dev, action: action) {
                        handler(ev)
                    }
                    udev_device_unref(dev)
                }
            }
        }
        thread = t
        t.start()
    }

    public func stop() {
        guard wakeup[1] >= 0 else { return }
        var one: UInt8 = 1
        _ = write(wakeup[1], &one, 1)
    }

    static func event(from dev: OpaquePointer, action: DeviceEvent.Action) -> DeviceEvent? {
        let subsystem = udev_device_get_subsystem(dev).map { String(cString: $0) }
        if subsystem == "block" {
            return .block(action, DeviceFacts(udevDevice: dev))
        }
        guard subsystem == "usb" else { return nil }
        func value(_ k: String) -> String? {
            (udev_device_get_property_value(dev, k) ?? udev_device_get_sysattr_value(dev, k)).map { String(cString: $0) }
        }
        // Only NVIDIA boards in recovery mode are of interest; the vendor id alone decides
        // here, the Tegra library checks the product id.
        guard let vendor = (value("ID_VENDOR_ID") ?? value("idVendor")).flatMap({ UInt16($0, radix: 16) }), vendor == 0x0955,
              let product = (value("ID_MODEL_ID") ?? value("idProduct")).flatMap({ UInt16($0, radix: 16) }) else { return nil }
        return .recovery(action, RecoveryUSBDevice(
            syspath: String(cString: udev_device_get_syspath(dev)),
            devnode: udev_device_get_devnode(dev).map { String(cString: $0) },
            vendorID: vendor, productID: product,
            busNumber: value("BUSNUM").flatMap { Int($0) } ?? 0,
            deviceAddress: value("DEVNUM").flatMap { Int($0) } ?? 0,
            serial: value("ID_SERIAL_SHORT")))
    }
}

/// Carries a pointer owned by one thread into that thread's closure.
struct UnsafeSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
