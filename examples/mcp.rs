//! An MCP server (the official `rmcp` SDK, streamable HTTP) with one free and one paid tool.
//!
//! ```sh
//! cargo run --example mcp --features mcp,test-util   # serves http://127.0.0.1:4023/mcp
//! ```
//!
//! `ping` is free; `weather` costs $0.001 in Base Sepolia USDC, paid with an x402 payment in
//! `params._meta["x402/payment"]` (the reference MCP clients, e.g. Python's `x402.mcp`, do
//! this on their own). A call without one gets the payment-required tool result; a paid call
//! gets the forecast and the receipt in `_meta["x402/payment-response"]`. Verification is
//! in-process and verify-only: no chain is needed, and no money moves.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tower_x402::Asset;
use tower_x402::PaymentOption;
use tower_x402::mcp::{PaidTool, tool_layer};
use tower_x402::primitives::address;

/// The server: its paid tool's guard, shared by every session.
#[derive(Clone)]
struct Weather {
    paid: PaidTool,
}

fn schema(value: serde_json::Value) -> Arc<serde_json::Map<String, serde_json::Value>> {
    Arc::new(match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    })
}

impl ServerHandler for Weather {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _cx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let city = schema(serde_json::json!({
            "type": "object",
            "properties": { "city": { "type": "string" } },
        }));
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new(
                "ping",
                "Free: answers pong",
                schema(serde_json::json!({"type": "object"})),
            ),
            Tool::new("weather", "Paid ($0.001 USDC): today's weather", city),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        cx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        match request.name.as_ref() {
            "ping" => Ok(CallToolResponse::Complete(CallToolResult::success(vec![
                ContentBlock::text("pong"),
            ]))),
            "weather" => {
                let city = request
                    .arguments
                    .as_ref()
                    .and_then(|a| a.get("city"))
                    .and_then(|c| c.as_str())
                    .unwrap_or("Paris")
                    .to_owned();
                // The closure runs once per accepted payment, after verification and claim.
                let result = self
                    .paid
                    .call(&request, &cx, move |payment| async move {
                        println!("weather for {city}, paid by {}", payment.payer);
                        Ok(CallToolResult::success(vec![ContentBlock::text(format!(
                            "{city}: sunny, 21 °C"
                        ))]))
                    })
                    .await?;
                Ok(CallToolResponse::Complete(result))
            }
            other => Err(ErrorData::invalid_params(format!("no tool {other}"), None)),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let layer = tool_layer("weather")
        .accept(PaymentOption::exact(
            &Asset::usdc_base_sepolia(),
            "$0.001",
            // Anvil's account #2: a public test address.
            address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
        )?)
        .build()?;
    let server = Weather {
        paid: PaidTool::new("weather", &layer),
    };
    let mcp = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let app = axum::Router::new().nest_service("/mcp", mcp);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:4023").await?;
    println!("MCP server on http://127.0.0.1:4023/mcp (tools: ping, weather)");
    axum::serve(listener, app).await?;
    Ok(())
}
