//! Who owns an address: under traffic capture the proxy knows a
//! connection only by its original destination (`SO_ORIGINAL_DST`), and
//! routes it to the service or endpoint that owns that address and port,
//! as Envoy's listeners per service address and port do in Istio.
//!
//! An address is owned by a service through the ServiceEntry's
//! `addresses` (a single address, the service's VIP) or the address
//! allocated to it (`crate::vip`), and by an endpoint through its own
//! address (a WorkloadEntry's or a listed endpoint's).
//! The index is built once per snapshot; a lookup is one hash probe, then
//! a scan of the ServiceEntries whose `addresses` are ranges (few).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::{Endpoint, Service};

/// What owns an original destination.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'s> {
    /// A service address (VIP): any endpoint of the service, on service
    /// port `port`.
    Service { svc: &'s Arc<Service>, port: u16 },
    /// One endpoint's address: that endpoint, reached as service port
    /// `port` of `svc` (whose endpoint port is the one dialed).
    Endpoint {
        svc: &'s Arc<Service>,
        endpoint: &'s Endpoint,
        port: u16,
    },
}

impl<'s> Owner<'s> {
    /// The service port the connection is for.
    pub fn port(&self) -> u16 {
        match self {
            Owner::Service { port, .. } | Owner::Endpoint { port, .. } => *port,
        }
    }

    pub fn service(&self) -> &'s Arc<Service> {
        match *self {
            Owner::Service { svc, .. } | Owner::Endpoint { svc, .. } => svc,
        }
    }

    /// Whether the connection speaks HTTP (the service port's protocol).
    pub fn is_http(&self) -> bool {
        let port = self.port();
        self.service()
            .ports
            .iter()
            .find(|p| p.number == port)
            .is_some_and(|p| p.is_http())
    }
}

/// Addresses to the services and endpoints that have them.
#[derive(Debug, Default)]
pub struct AddressIndex {
    /// Exact addresses: (service index, endpoint index or `None` for a
    /// service address), in service order.
    exact: HashMap<IpAddr, Vec<(usize, Option<usize>)>>,
    /// Services with an address range in `addresses`.
    ranges: Vec<usize>,
}

impl AddressIndex {
    pub fn build(services: &[Arc<Service>]) -> AddressIndex {
        let mut index = AddressIndex::default();
        // Explicit addresses and endpoints first: an allocated address
        // never hides one.
        for (i, svc) in services.iter().enumerate() {
            let mut ranged = false;
            for net in &svc.addresses {
                if net.prefix_len() == net.max_prefix_len() {
                    index.exact.entry(net.addr()).or_default().push((i, None));
                } else {
                    ranged = true;
                }
            }
            if ranged {
                index.ranges.push(i);
            }
            for (e, ep) in svc.endpoints.iter().enumerate() {
                index
                    .exact
                    .entry(ep.address)
                    .or_default()
                    .push((i, Some(e)));
            }
        }
        for (i, svc) in services.iter().enumerate() {
            for ip in &svc.allocated {
                index.exact.entry(*ip).or_default().push((i, None));
            }
        }
        index
    }

    /// The owner of `ip`:`port` among `services` (those the index was built
    /// from): a service address first, then an endpoint address, then a
    /// range of a ServiceEntry's `addresses`; the first service (in the
    /// snapshot's order) that has the port.
    pub fn owner<'s>(
        &self,
        services: &'s [Arc<Service>],
        ip: IpAddr,
        port: u16,
    ) -> Option<Owner<'s>> {
        let exact = self.exact.get(&ip).map(Vec::as_slice).unwrap_or_default();
        let service_port = |svc: &Service| svc.ports.iter().any(|p| p.number == port);
        let by_vip = exact.iter().find_map(|&(i, e)| {
            let svc = &services[i];
            (e.is_none() && service_port(svc)).then_some(Owner::Service { svc, port })
        });
        if by_vip.is_some() {
            return by_vip;
        }
        let by_endpoint = exact.iter().find_map(|&(i, e)| {
            let svc = &services[i];
            let endpoint = &svc.endpoints[e?];
            let sp = svc
                .ports
                .iter()
                .find(|sp| svc.endpoint_port(sp, endpoint) == port)?;
            Some(Owner::Endpoint {
                svc,
                endpoint,
                port: sp.number,
            })
        });
        if by_endpoint.is_some() {
            return by_endpoint;
        }
        self.ranges.iter().find_map(|&i| {
            let svc = &services[i];
            (svc.addresses.iter().any(|n| n.contains(&ip)) && service_port(svc))
                .then_some(Owner::Service { svc, port })
        })
    }
}
