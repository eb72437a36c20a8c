//! The command table and dispatch: envelope checks, capabilities
//! negotiation, argument checks and each command's effect on the VM.
//!
//! Every command follows its QEMU schema (`qapi/*.json`) for arguments and
//! return value. The events a command causes are returned with its reply so
//! the server can deliver them in QEMU's order: `STOP` and `RESUME` before
//! the reply of `stop` and `cont` (QEMU emits them while the command runs),
//! `POWERDOWN` and `SHUTDOWN` after the reply of `system_powerdown`,
//! `system_reset` and `quit` (QEMU's main loop emits them afterwards).

use super::args::{Args, invalid_type};
use super::error::{ErrorClass, QmpError};
use super::event::{QmpEvent, ShutdownCause};
use super::protocol::{self, Request};
use super::qom;
use super::vm_ops::{RunState, VmOps};
use serde_json::{Value, json};

/// The target `query-cpus-fast` reports.
const TARGET: &str = "x86_64";

/// What one request produced.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Events to deliver before the reply.
    pub before: Vec<QmpEvent>,
    /// The reply, with the request's `id`.
    pub reply: Value,
    /// Events to deliver after the reply.
    pub after: Vec<QmpEvent>,
}

/// The state a command sees.
struct Ctx<'a> {
    vm: &'a mut dyn VmOps,
    negotiated: &'a mut bool,
    before: Vec<QmpEvent>,
    after: Vec<QmpEvent>,
}

type Handler = fn(&mut Ctx<'_>, Args) -> Result<Value, QmpError>;

struct Command {
    name: &'static str,
    handler: Handler,
}

/// Every command, in the order `query-commands` lists them.
const COMMANDS: &[Command] = &[
    Command {
        name: "qmp_capabilities",
        handler: qmp_capabilities,
    },
    Command {
        name: "query-version",
        handler: query_version,
    },
    Command {
        name: "query-commands",
        handler: query_commands,
    },
    Command {
        name: "query-status",
        handler: query_status,
    },
    Command {
        name: "query-cpus-fast",
        handler: query_cpus_fast,
    },
    Command {
        name: "query-memory-size-summary",
        handler: query_memory_size_summary,
    },
    Command {
        name: "query-memory-devices",
        handler: query_memory_devices,
    },
    Command {
        name: "qom-get",
        handler: qom_get,
    },
    Command {
        name: "qom-set",
        handler: qom_set,
    },
    Command {
        name: "stop",
        handler: stop,
    },
    Command {
        name: "cont",
        handler: cont,
    },
    Command {
        name: "system_powerdown",
        handler: system_powerdown,
    },
    Command {
        name: "system_reset",
        handler: system_reset,
    },
    Command {
        name: "quit",
        handler: quit,
    },
    Command {
        name: "x-query-rcu",
        handler: x_query_rcu,
    },
    Command {
        name: "x-query-hotplug",
        handler: x_query_hotplug,
    },
];

/// The name of every command, in `query-commands` order.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    COMMANDS.iter().map(|c| c.name)
}

/// The one command allowed before negotiation.
const NEGOTIATE: &str = "qmp_capabilities";

/// Runs one parsed message from a client whose negotiation state is
/// `negotiated` (updated by `qmp_capabilities`).
pub(crate) fn execute(message: Value, negotiated: &mut bool, vm: &mut dyn VmOps) -> Outcome {
    let was_negotiated = *negotiated;
    let (id, request) = protocol::parse_request(message);
    let mut ctx = Ctx {
        vm,
        negotiated,
        before: Vec::new(),
        after: Vec::new(),
    };
    let result = request.and_then(|r| run(&mut ctx, r, was_negotiated));
    // QEMU answers every unknown command with this during negotiation.
    let result = result.map_err(|e| {
        if !was_negotiated && e.class() == ErrorClass::CommandNotFound {
            e.with_desc("Expecting capabilities negotiation with 'qmp_capabilities'")
        } else {
            e
        }
    });
    Outcome {
        before: ctx.before,
        reply: protocol::response(id, result),
        after: ctx.after,
    }
}

fn run(ctx: &mut Ctx<'_>, request: Request, negotiated: bool) -> Result<Value, QmpError> {
    let command = COMMANDS
        .iter()
        .find(|c| c.name == request.execute)
        .filter(|c| negotiated || c.name == NEGOTIATE)
        .ok_or_else(|| {
            QmpError::command_not_found(format!(
                "The command {} has not been found",
                request.execute
            ))
        })?;
    (command.handler)(ctx, Args::new(request.arguments))
}

fn qmp_capabilities(ctx: &mut Ctx<'_>, mut args: Args) -> Result<Value, QmpError> {
    let enable = args.opt_array("enable")?.unwrap_or_default();
    for (i, cap) in enable.iter().enumerate() {
        match cap.as_str() {
            // QEMU's only capability; it is never offered here.
            Some("oob") => {}
            // QEMU names list elements 'null' in this message
            // (qapi-visit-core.c, input_type_enum()).
            Some(other) => {
                return Err(QmpError::generic(format!(
                    "Parameter 'null' does not accept value '{other}'"
                )));
            }
            None => return Err(invalid_type(&format!("enable[{i}]"), "string")),
        }
    }
    args.finish()?;
    if *ctx.negotiated {
        return Err(QmpError::command_not_found(
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    if !enable.is_empty() {
        return Err(QmpError::generic("Capability oob not available"));
    }
    *ctx.negotiated = true;
    Ok(json!({}))
}

fn query_version(_: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(protocol::version_info())
}

fn query_commands(_: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(command_names().map(|name| json!({"name": name})).collect())
}

fn query_status(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let state = ctx.vm.run_state();
    Ok(json!({"running": state.is_running(), "status": state.as_str()}))
}

fn query_cpus_fast(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(ctx
        .vm
        .cpus()
        .iter()
        .map(|c| {
            json!({
                "cpu-index": c.index,
                "qom-path": format!("/machine/unattached/device[{}]", c.index),
                "thread-id": c.thread_id,
                "props": {"socket-id": 0, "core-id": c.index, "thread-id": 0},
                "target": TARGET,
            })
        })
        .collect())
}

fn query_memory_size_summary(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let devices = ctx.vm.memory_devices();
    let mut summary = json!({"base-memory": ctx.vm.base_memory()});
    // QEMU reports plugged memory when the machine has a hot-plug area.
    if !devices.is_empty() {
        let plugged = devices
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.size));
        summary["plugged-memory"] = Value::from(plugged);
    }
    Ok(summary)
}

fn query_memory_devices(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(ctx
        .vm
        .memory_devices()
        .iter()
        .map(|d| {
            json!({
                "type": "virtio-mem",
                "data": {
                    "id": d.id,
                    "memaddr": d.memaddr,
                    "requested-size": d.requested_size,
                    "size": d.size,
                    "max-size": d.max_size,
                    "block-size": d.block_size,
                    "node": d.node,
                    "memdev": d.memdev,
                },
            })
        })
        .collect())
}

fn qom_get(ctx: &mut Ctx<'_>, mut args: Args) -> Result<Value, QmpError> {
    let path = args.str("path")?;
    let property = args.str("property")?;
    args.finish()?;
    let devices = ctx.vm.memory_devices();
    let device = qom::resolve(&devices, &path)?;
    if property == qom::STALL_TIMEOUT {
        return ctx
            .vm
            .stall_timeout_ms(&device.id)
            .map(Value::from)
            .ok_or_else(|| qom::not_found(&property));
    }
    qom::get(device, &property)
}

fn qom_set(ctx: &mut Ctx<'_>, mut args: Args) -> Result<Value, QmpError> {
    let path = args.str("path")?;
    let property = args.str("property")?;
    let value = args.any("value")?;
    args.finish()?;
    let devices = ctx.vm.memory_devices();
    let device = qom::resolve(&devices, &path)?;
    match qom::to_set(device, &property, &value)? {
        qom::QomSet::RequestedSize(size) => ctx.vm.set_requested_size(&device.id, size)?,
        qom::QomSet::StallTimeout(ms) => ctx.vm.set_stall_timeout(&device.id, ms)?,
    }
    Ok(json!({}))
}

fn stop(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    // As QEMU: stopping a VM that does not run changes nothing.
    if ctx.vm.run_state() == RunState::Running {
        ctx.vm.stop()?;
        ctx.before.push(QmpEvent::Stop);
    }
    Ok(json!({}))
}

fn cont(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    let state = ctx.vm.run_state();
    if state.needs_reset() {
        return Err(QmpError::generic(
            "Resetting the Virtual Machine is required",
        ));
    }
    if !state.is_running() {
        ctx.vm.cont()?;
        ctx.before.push(QmpEvent::Resume);
    }
    Ok(json!({}))
}

fn system_powerdown(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    ctx.vm.system_powerdown()?;
    ctx.after.push(QmpEvent::Powerdown);
    Ok(json!({}))
}

fn system_reset(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    ctx.vm.system_reset()?;
    // A reboot in place is announced with RESET once done (machine.rs).
    if !ctx.vm.reboots_on_reset() {
        ctx.after
            .push(QmpEvent::Shutdown(ShutdownCause::HostQmpSystemReset));
    }
    Ok(json!({}))
}

fn quit(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    ctx.vm.quit();
    ctx.after
        .push(QmpEvent::Shutdown(ShutdownCause::HostQmpQuit));
    Ok(json!({}))
}

fn x_query_rcu(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(ctx.vm.rcu_stats())
}

fn x_query_hotplug(ctx: &mut Ctx<'_>, args: Args) -> Result<Value, QmpError> {
    args.finish()?;
    Ok(ctx.vm.hotplug_state())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::FakeVm;

    /// Runs `message` on a negotiated connection.
    fn exec(vm: &mut FakeVm, message: Value) -> Outcome {
        let mut negotiated = true;
        execute(message, &mut negotiated, vm)
    }

    fn ret(vm: &mut FakeVm, message: Value) -> Value {
        let o = exec(vm, message);
        assert!(o.reply.get("error").is_none(), "{}", o.reply);
        o.reply["return"].clone()
    }

    fn err(vm: &mut FakeVm, message: Value) -> (String, String) {
        let o = exec(vm, message);
        let e = &o.reply["error"];
        (
            e["class"].as_str().unwrap().to_string(),
            e["desc"].as_str().unwrap().to_string(),
        )
    }

    fn generic(desc: &str) -> (String, String) {
        ("GenericError".into(), desc.into())
    }

    #[test]
    fn test_before_negotiation_only_qmp_capabilities_runs() {
        let mut vm = FakeVm::new();
        let mut negotiated = false;
        for name in ["query-status", "stop", "quit", "no-such-command"] {
            let o = execute(json!({"execute": name, "id": 1}), &mut negotiated, &mut vm);
            assert_eq!(
                o.reply,
                json!({"error": {"class": "CommandNotFound",
                    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                    "id": 1})
            );
        }
        assert!(vm.calls.is_empty(), "nothing ran: {:?}", vm.calls);
        assert!(!negotiated);
        let o = execute(
            json!({"execute": "qmp_capabilities"}),
            &mut negotiated,
            &mut vm,
        );
        assert_eq!(o.reply, json!({"return": {}}));
        assert!(negotiated);
    }

    #[test]
    fn test_envelope_errors_before_negotiation_are_not_rewritten() {
        let mut vm = FakeVm::new();
        let mut negotiated = false;
        let o = execute(json!({"id": 3}), &mut negotiated, &mut vm);
        assert_eq!(
            o.reply,
            json!({"error": {"class": "GenericError",
                "desc": "QMP input lacks member 'execute'"}, "id": 3})
        );
    }

    #[test]
    fn test_qmp_capabilities_twice_is_already_complete() {
        let mut vm = FakeVm::new();
        assert_eq!(
            err(&mut vm, json!({"execute": "qmp_capabilities"})),
            (
                "CommandNotFound".into(),
                "Capabilities negotiation is already complete, command ignored".into()
            )
        );
    }

    #[test]
    fn test_qmp_capabilities_enable_rules() {
        let cases = [
            (json!({"enable": []}), None),
            (
                json!({"enable": ["oob"]}),
                Some("Capability oob not available"),
            ),
            (
                json!({"enable": ["fancy"]}),
                Some("Parameter 'null' does not accept value 'fancy'"),
            ),
            (
                json!({"enable": [1]}),
                Some("Invalid parameter type for 'enable[0]', expected: string"),
            ),
            (
                json!({"enable": "oob"}),
                Some("Invalid parameter type for 'enable', expected: array"),
            ),
            (json!({"other": 1}), Some("Parameter 'other' is unexpected")),
        ];
        for (args, expected) in cases {
            let mut vm = FakeVm::new();
            let mut negotiated = false;
            let o = execute(
                json!({"execute": "qmp_capabilities", "arguments": args}),
                &mut negotiated,
                &mut vm,
            );
            match expected {
                None => {
                    assert_eq!(o.reply, json!({"return": {}}));
                    assert!(negotiated);
                }
                Some(desc) => {
                    assert_eq!(o.reply["error"]["class"], "GenericError", "{args}");
                    assert_eq!(o.reply["error"]["desc"], desc, "{args}");
                    assert!(!negotiated);
                }
            }
        }
    }

    #[test]
    fn test_id_is_echoed_for_success_and_every_error() {
        let mut vm = FakeVm::new();
        for id in [json!(1), json!("x"), json!({"a": [1, null]}), json!(null)] {
            for msg in [
                json!({"execute": "query-status", "id": id}),
                json!({"execute": "nope", "id": id}),
                json!({"execute": "query-status", "arguments": {"x": 1}, "id": id}),
                json!({"execute": 5, "id": id}),
            ] {
                assert_eq!(exec(&mut vm, msg).reply["id"], id);
            }
        }
        assert!(
            exec(&mut vm, json!({"execute": "query-status"}))
                .reply
                .get("id")
                .is_none()
        );
    }

    #[test]
    fn test_unknown_command_after_negotiation() {
        let mut vm = FakeVm::new();
        assert_eq!(
            err(&mut vm, json!({"execute": "foo"})),
            (
                "CommandNotFound".into(),
                "The command foo has not been found".into()
            )
        );
    }

    #[test]
    fn test_no_argument_commands_reject_arguments() {
        for name in
            command_names().filter(|n| !["qmp_capabilities", "qom-get", "qom-set"].contains(n))
        {
            let mut vm = FakeVm::new();
            assert_eq!(
                err(&mut vm, json!({"execute": name, "arguments": {"x": 1}})),
                generic("Parameter 'x' is unexpected"),
                "{name}"
            );
            assert!(vm.calls.is_empty(), "{name} acted: {:?}", vm.calls);
        }
    }

    #[test]
    fn test_query_version_matches_greeting() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(&mut vm, json!({"execute": "query-version"})),
            protocol::greeting()["QMP"]["version"]
        );
    }

    #[test]
    fn test_query_commands_lists_every_command() {
        let mut vm = FakeVm::new();
        let list = ret(&mut vm, json!({"execute": "query-commands"}));
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "qmp_capabilities",
                "query-version",
                "query-commands",
                "query-status",
                "query-cpus-fast",
                "query-memory-size-summary",
                "query-memory-devices",
                "qom-get",
                "qom-set",
                "stop",
                "cont",
                "system_powerdown",
                "system_reset",
                "quit",
                "x-query-rcu",
                "x-query-hotplug"
            ]
        );
    }

    #[test]
    fn test_query_status_shapes() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(&mut vm, json!({"execute": "query-status"})),
            json!({"running": true, "status": "running"})
        );
        vm.state = RunState::Paused;
        assert_eq!(
            ret(&mut vm, json!({"execute": "query-status"})),
            json!({"running": false, "status": "paused"})
        );
    }

    #[test]
    fn test_query_cpus_fast_shape() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(&mut vm, json!({"execute": "query-cpus-fast"})),
            json!([
                {"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": 1000,
                 "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}, "target": "x86_64"},
                {"cpu-index": 1, "qom-path": "/machine/unattached/device[1]", "thread-id": 1001,
                 "props": {"socket-id": 0, "core-id": 1, "thread-id": 0}, "target": "x86_64"}
            ])
        );
    }

    #[test]
    fn test_query_memory_size_summary_with_and_without_hotplug() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(&mut vm, json!({"execute": "query-memory-size-summary"})),
            json!({"base-memory": 512u64 << 20, "plugged-memory": 0x800_0000})
        );
        vm.devices.clear();
        assert_eq!(
            ret(&mut vm, json!({"execute": "query-memory-size-summary"})),
            json!({"base-memory": 512u64 << 20})
        );
    }

    #[test]
    fn test_query_memory_devices_shape() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(&mut vm, json!({"execute": "query-memory-devices"})),
            json!([{"type": "virtio-mem", "data": {
                "id": "vmem0", "memaddr": 0x1_0000_0000u64, "requested-size": 0,
                "size": 0x800_0000, "max-size": 0x1_0000_0000u64, "block-size": 0x20_0000,
                "node": 0, "memdev": "/objects/mem0"}}])
        );
    }

    #[test]
    fn test_qom_get_values_and_errors() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(
                &mut vm,
                json!({"execute": "qom-get", "arguments": {"path": "/machine/peripheral/vmem0", "property": "size"}})
            ),
            json!(0x800_0000)
        );
        assert_eq!(
            err(
                &mut vm,
                json!({"execute": "qom-get", "arguments": {"path": "vmem9", "property": "size"}})
            ),
            ("DeviceNotFound".into(), "Device 'vmem9' not found".into())
        );
        assert_eq!(
            err(
                &mut vm,
                json!({"execute": "qom-get", "arguments": {"path": "vmem0", "property": "x"}})
            ),
            generic("Property 'virtio-mem.x' not found")
        );
        assert_eq!(
            err(
                &mut vm,
                json!({"execute": "qom-get", "arguments": {"property": "size"}})
            ),
            generic("Parameter 'path' is missing")
        );
        assert_eq!(
            err(
                &mut vm,
                json!({"execute": "qom-get", "arguments": {"path": 0, "property": "size"}})
            ),
            generic("Invalid parameter type for 'path', expected: string")
        );
    }

    #[test]
    fn test_qom_set_requested_size_reaches_the_vm() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(
                &mut vm,
                json!({"execute": "qom-set", "arguments": {"path": "vmem0", "property": "requested-size", "value": 0x4000_0000}})
            ),
            json!({})
        );
        assert_eq!(vm.calls, ["set_requested_size vmem0 0x40000000"]);
        assert_eq!(
            ret(
                &mut vm,
                json!({"execute": "qom-get", "arguments": {"path": "vmem0", "property": "requested-size"}})
            ),
            json!(0x4000_0000)
        );
    }

    #[test]
    fn test_qom_stall_timeout_extension_property() {
        let mut vm = FakeVm::new();
        let get = json!({"execute": "qom-get", "arguments": {"path": "/machine/peripheral/vmem0", "property": "x-stall-timeout"}});
        assert_eq!(ret(&mut vm, get.clone()), json!(10_000));
        assert_eq!(
            ret(
                &mut vm,
                json!({"execute": "qom-set", "arguments": {"path": "vmem0", "property": "x-stall-timeout", "value": 1500}})
            ),
            json!({})
        );
        assert_eq!(vm.calls, ["set_stall_timeout vmem0 1500"]);
        assert_eq!(ret(&mut vm, get), json!(1500));
        // Out of range: refused before the VM sees it.
        let e = err(
            &mut vm,
            json!({"execute": "qom-set", "arguments": {"path": "vmem0", "property": "x-stall-timeout", "value": 5}}),
        );
        assert_eq!(
            e,
            generic("'x-stall-timeout' must be between 100 and 86400000 (milliseconds)")
        );
        assert_eq!(vm.calls.len(), 1);
    }

    #[test]
    fn test_qom_set_rejections_do_not_reach_the_vm() {
        let cases = [
            (
                json!({"path": "vmem0", "property": "requested-size"}),
                generic("Parameter 'value' is missing"),
            ),
            (
                json!({"path": "vmem0", "property": "requested-size", "value": "1G"}),
                generic("Parameter 'requested-size' expects uint64"),
            ),
            (
                json!({"path": "vmem0", "property": "requested-size", "value": 1, "extra": 2}),
                generic("Parameter 'extra' is unexpected"),
            ),
            (
                json!({"path": "nope", "property": "requested-size", "value": 0}),
                ("DeviceNotFound".into(), "Device 'nope' not found".into()),
            ),
            (
                json!({"path": "vmem0", "property": "block-size", "value": 0}),
                generic("Property 'virtio-mem.block-size' is not writable"),
            ),
        ];
        for (args, expected) in cases {
            let mut vm = FakeVm::new();
            assert_eq!(
                err(&mut vm, json!({"execute": "qom-set", "arguments": args})),
                expected,
                "{args}"
            );
            assert!(vm.calls.is_empty());
        }
    }

    #[test]
    fn test_qom_set_vm_refusal_is_passed_on() {
        let mut vm = FakeVm::new();
        vm.fail = Some(QmpError::generic("guest is not ready"));
        assert_eq!(
            err(
                &mut vm,
                json!({"execute": "qom-set", "arguments": {"path": "vmem0", "property": "requested-size", "value": 0}})
            ),
            generic("guest is not ready")
        );
    }

    #[test]
    fn test_stop_and_cont_emit_events_before_reply() {
        let mut vm = FakeVm::new();
        let o = exec(&mut vm, json!({"execute": "stop"}));
        assert_eq!(o.before, [QmpEvent::Stop]);
        assert!(o.after.is_empty());
        assert_eq!(vm.state, RunState::Paused);
        // Already paused: nothing happens.
        let o = exec(&mut vm, json!({"execute": "stop"}));
        assert!(o.before.is_empty());
        let o = exec(&mut vm, json!({"execute": "cont"}));
        assert_eq!(o.before, [QmpEvent::Resume]);
        let o = exec(&mut vm, json!({"execute": "cont"}));
        assert!(o.before.is_empty());
        assert_eq!(vm.calls, ["stop", "cont"]);
    }

    #[test]
    fn test_cont_after_shutdown_needs_reset() {
        let mut vm = FakeVm::new();
        vm.state = RunState::Shutdown;
        assert_eq!(
            err(&mut vm, json!({"execute": "cont"})),
            generic("Resetting the Virtual Machine is required")
        );
        assert!(vm.calls.is_empty());
    }

    #[test]
    fn test_failed_stop_emits_nothing() {
        let mut vm = FakeVm::new();
        vm.fail = Some(QmpError::generic("vCPU 1 did not pause"));
        let o = exec(&mut vm, json!({"execute": "stop"}));
        assert_eq!(o.reply["error"]["desc"], "vCPU 1 did not pause");
        assert!(o.before.is_empty() && o.after.is_empty());
    }

    #[test]
    fn test_lifecycle_commands_emit_events_after_reply() {
        let cases = [
            ("system_powerdown", QmpEvent::Powerdown),
            (
                "system_reset",
                QmpEvent::Shutdown(ShutdownCause::HostQmpSystemReset),
            ),
            ("quit", QmpEvent::Shutdown(ShutdownCause::HostQmpQuit)),
        ];
        for (name, event) in cases {
            let mut vm = FakeVm::new();
            let o = exec(&mut vm, json!({"execute": name, "id": 9}));
            assert_eq!(o.reply, json!({"return": {}, "id": 9}));
            assert!(o.before.is_empty());
            assert_eq!(o.after, [event]);
            assert_eq!(vm.calls, [name]);
        }
    }

    #[test]
    fn test_x_query_rcu_returns_vm_statistics() {
        let mut vm = FakeVm::new();
        assert_eq!(
            ret(&mut vm, json!({"execute": "x-query-rcu"})),
            json!({"call_rcu": 42})
        );
    }
}
